//! Operators' commands, through `OperationsService` (an admin token when
//! the server has tokens): `dead-letters list`, `dead-letters requeue` and
//! `queues`, each a plain-text table for a person or `grep`/`awk`.

use crate::Auth;
use anyhow::Context;
use clap::Subcommand;
use nexus_proto::v1::operations_service_client::OperationsServiceClient;
use nexus_proto::v1::{
    DeadLetter, DeadLetterRef, ListDeadLettersRequest, QueueStatsRequest, RequeueDeadLettersRequest, ShardStats,
};
use std::process::ExitCode;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub type Client = OperationsServiceClient<InterceptedService<Channel, Auth>>;

pub fn client(channel: Channel, auth: Auth) -> Client {
    OperationsServiceClient::with_interceptor(channel, auth)
}

#[derive(Subcommand)]
pub enum DeadLetters {
    /// List dead letters, oldest first, shard by shard: run, phase, starts,
    /// when, and why.
    List {
        /// Only this shard's.
        #[arg(long)]
        shard: Option<u32>,
    },
    /// Requeue dead letters after a fix. The run a dead letter failed stays
    /// failed: each requeue starts a fork of it from the dead-lettered
    /// phase (its earlier phases copied, no model call) and then removes
    /// the dead letter. Requeueing again returns the same fork. Exits 1 when
    /// any could not be requeued.
    Requeue {
        /// Every dead letter of every shard.
        #[arg(long, conflicts_with = "entries")]
        all: bool,
        /// Dead letters as SHARD:ENTRY_ID, as `dead-letters list` shows them.
        #[arg(value_parser = parse_ref, required_unless_present = "all")]
        entries: Vec<DeadLetterRef>,
    },
}

fn parse_ref(text: &str) -> Result<DeadLetterRef, String> {
    let (shard, entry_id) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not SHARD:ENTRY_ID"))?;
    let shard = shard
        .parse()
        .map_err(|_| format!("{text:?}: the shard {shard:?} is not a number"))?;
    Ok(DeadLetterRef {
        shard,
        entry_id: entry_id.to_string(),
    })
}

pub async fn dead_letters(client: &mut Client, command: DeadLetters) -> anyhow::Result<ExitCode> {
    match command {
        DeadLetters::List { shard } => {
            let letters = list_all(client, shard).await?;
            print!("{}", dead_letter_table(&letters));
            Ok(ExitCode::SUCCESS)
        }
        DeadLetters::Requeue { all, entries } => requeue(client, all, entries).await,
    }
}

/// Every page of the listing.
async fn list_all(client: &mut Client, shard: Option<u32>) -> anyhow::Result<Vec<DeadLetter>> {
    let mut letters = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_dead_letters(ListDeadLettersRequest {
                shard,
                page_size: 100,
                page_token,
            })
            .await?
            .into_inner();
        letters.extend(page.dead_letters);
        if page.next_page_token.is_empty() {
            return Ok(letters);
        }
        page_token = page.next_page_token;
    }
}

fn dead_letter_table(letters: &[DeadLetter]) -> String {
    if letters.is_empty() {
        return "no dead letters\n".to_string();
    }
    let mut rows = vec![row(["DEAD LETTER", "WORKFLOW", "PHASE", "STARTS", "AT", "REASON"])];
    for letter in letters {
        let (workflow, phase) = if letter.workflow_id.is_empty() {
            ("-".to_string(), "-".to_string())
        } else {
            (
                letter.workflow_id.clone(),
                format!("{} {}", letter.phase_index + 1, letter.phase),
            )
        };
        let mut reason = letter.reason.clone();
        if !letter.requeued_as.is_empty() {
            reason = format!("(requeued as {}; requeue again to finish) {reason}", letter.requeued_as);
        }
        rows.push(vec![
            format!("{}:{}", letter.shard, letter.entry_id),
            workflow,
            phase,
            letter.deliveries.to_string(),
            letter
                .dead_lettered_at
                .as_ref()
                .map_or_else(|| "-".to_string(), crate::json::timestamp),
            reason,
        ]);
    }
    table(&rows)
}

async fn requeue(client: &mut Client, all: bool, entries: Vec<DeadLetterRef>) -> anyhow::Result<ExitCode> {
    let answers = client
        .requeue_dead_letters(RequeueDeadLettersRequest { entries, all })
        .await?
        .into_inner()
        .requeued;
    let mut failed = 0;
    for answer in &answers {
        let name = format!("{}:{}", answer.shard, answer.entry_id);
        if answer.error.is_empty() {
            println!(
                "{name}  requeued as {} (fork of {})",
                answer.new_workflow_id, answer.workflow_id
            );
        } else {
            failed += 1;
            println!("{name}  not requeued: {}", answer.error);
        }
    }
    if answers.is_empty() {
        println!("no dead letters");
    } else {
        println!("{} of {} requeued", answers.len() - failed, answers.len());
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `nexus queues`: one row per shard, and a total when there are several.
pub async fn queues(client: &mut Client) -> anyhow::Result<()> {
    let shards = client.queue_stats(QueueStatsRequest {}).await?.into_inner().shards;
    let first = shards.first().context("the server reported no shards")?;
    let mut rows = vec![row([
        "SHARD",
        "QUEUED",
        "PENDING",
        "LAG",
        "CONSUMERS",
        "OLDEST PENDING",
        "DEAD LETTERS",
        "AWAITING APPROVAL",
    ])];
    rows.extend(shards.iter().map(|stats| shard_row(stats.shard.to_string(), stats)));
    if shards.len() > 1 {
        let total = shards.iter().skip(1).fold(*first, |sum, stats| ShardStats {
            queued: sum.queued + stats.queued,
            pending: sum.pending + stats.pending,
            lag: if sum.lag < 0 || stats.lag < 0 {
                -1
            } else {
                sum.lag + stats.lag
            },
            consumers: sum.consumers.max(stats.consumers),
            oldest_pending_ms: sum.oldest_pending_ms.max(stats.oldest_pending_ms),
            dead_letters: sum.dead_letters + stats.dead_letters,
            awaiting_approval: sum.awaiting_approval + stats.awaiting_approval,
            ..sum
        });
        rows.push(shard_row("all".to_string(), &total));
    }
    print!("{}", table(&rows));
    if shards.iter().any(|stats| stats.lag < 0) {
        println!("LAG ?: Redis cannot tell (an unread task was deleted by hand, or Redis is older than 7)");
    }
    Ok(())
}

fn shard_row(name: String, stats: &ShardStats) -> Vec<String> {
    let lag = if stats.lag < 0 {
        "?".to_string()
    } else {
        stats.lag.to_string()
    };
    let oldest = if stats.pending == 0 {
        "-".to_string()
    } else {
        format!("{:.1}s", stats.oldest_pending_ms as f64 / 1000.0)
    };
    vec![
        name,
        stats.queued.to_string(),
        stats.pending.to_string(),
        lag,
        stats.consumers.to_string(),
        oldest,
        stats.dead_letters.to_string(),
        stats.awaiting_approval.to_string(),
    ]
}

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|cell| cell.to_string()).collect()
}

/// Rows as left-aligned columns two spaces apart; the last column is not
/// padded, so a long reason does not push trailing spaces.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|column| {
            rows.iter()
                .filter_map(|row| row.get(column))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let last = row.len().saturating_sub(1);
        for (column, cell) in row.iter().enumerate() {
            if column == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  ", width = widths[column]));
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_is_named_shard_colon_entry_id() {
        let parsed = parse_ref("2:1732612345678-0").unwrap();
        assert_eq!((parsed.shard, parsed.entry_id.as_str()), (2, "1732612345678-0"));
        assert!(parse_ref("1732612345678-0").is_err());
        assert!(parse_ref("x:1-0").is_err());
    }

    #[test]
    fn tables_align_their_columns() {
        let text = table(&[row(["SHARD", "QUEUED"]), row(["0", "12"]), row(["10", "3"])]);
        assert_eq!(text, "SHARD  QUEUED\n0      12\n10     3\n");
    }
}
