//! Steering a run from the terminal: open or close its approval gate, fork
//! it from a phase with other models or prompts, and compare branches.

use crate::Client;
use anyhow::Context;
use nexus_proto::v1::{
    ApproveStepRequest, CompareWorkflowsRequest, CompareWorkflowsResponse, ForkWorkflowRequest, GetWorkflowRequest,
    RejectStepRequest, Workflow, WorkflowStatus,
};
use std::collections::HashMap;
use std::path::PathBuf;

/// The phase a run waits at: the one given, else the one the server says.
async fn gated_phase(client: &mut Client, workflow_id: &str, given: Option<u32>) -> anyhow::Result<u32> {
    if let Some(index) = given {
        return Ok(index);
    }
    let workflow = client
        .get_workflow(GetWorkflowRequest {
            workflow_id: workflow_id.to_string(),
            omit_outputs: true,
        })
        .await?
        .into_inner();
    match workflow.approval {
        Some(gate) => Ok(gate.index),
        None => anyhow::bail!(
            "workflow {workflow_id} is {}; it does not wait for approval",
            status_name(workflow.status())
        ),
    }
}

/// `nexus approve`: opens the gate, with the file's text replacing the
/// phase's output when `edit` is given.
pub async fn approve(
    client: &mut Client,
    workflow_id: String,
    phase: Option<u32>,
    edit: Option<PathBuf>,
    comment: String,
) -> anyhow::Result<Workflow> {
    let phase_index = gated_phase(client, &workflow_id, phase).await?;
    let edited_output = edit
        .map(|path| std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display())))
        .transpose()?;
    let response = client
        .approve_step(ApproveStepRequest {
            workflow_id,
            phase_index,
            edited_output,
            comment,
        })
        .await?
        .into_inner();
    response.workflow.context("the server returned no workflow")
}

/// `nexus reject`: fails the run at its gate.
pub async fn reject(
    client: &mut Client,
    workflow_id: String,
    phase: Option<u32>,
    reason: String,
) -> anyhow::Result<Workflow> {
    let phase_index = gated_phase(client, &workflow_id, phase).await?;
    let response = client
        .reject_step(RejectStepRequest {
            workflow_id,
            phase_index,
            reason,
        })
        .await?
        .into_inner();
    response.workflow.context("the server returned no workflow")
}

/// What `nexus fork` asks for.
pub struct Fork {
    pub workflow_id: String,
    pub from_phase: String,
    pub models: Vec<(String, String)>,
    /// Phase name → file with its new prompt template.
    pub prompts: Vec<(String, String)>,
    pub instructions: String,
    pub idempotency_key: String,
    pub no_cache: bool,
    pub max_cost_usd: f64,
}

/// `nexus fork`: starts the fork; returns its id and whether it is new.
pub async fn fork(client: &mut Client, fork: Fork) -> anyhow::Result<(String, bool)> {
    let prompts = fork
        .prompts
        .into_iter()
        .map(|(phase, path)| {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading the prompt for {phase} from {path}"))?;
            Ok((phase, text))
        })
        .collect::<anyhow::Result<HashMap<_, _>>>()?;
    let response = client
        .fork_workflow(ForkWorkflowRequest {
            workflow_id: fork.workflow_id,
            from_phase: fork.from_phase,
            models: fork.models.into_iter().collect(),
            prompts,
            instructions: fork.instructions,
            idempotency_key: fork.idempotency_key,
            no_cache: fork.no_cache,
            max_cost_usd: fork.max_cost_usd,
        })
        .await?
        .into_inner();
    Ok((response.workflow_id, response.created))
}

/// `nexus compare`: the runs side by side, one row per phase.
pub async fn compare(client: &mut Client, workflow_ids: Vec<String>) -> anyhow::Result<()> {
    let comparison = client
        .compare_workflows(CompareWorkflowsRequest { workflow_ids })
        .await?
        .into_inner();
    print!("{}", comparison_table(&comparison));
    Ok(())
}

/// The comparison as text: runs as columns (A, B, …), phases as rows; a
/// cell names the run whose output it shares (`= A`) or says it differs.
pub fn comparison_table(comparison: &CompareWorkflowsResponse) -> String {
    let mut out = String::new();
    let letter = |i: usize| char::from(b'A' + i as u8);
    for (i, run) in comparison.runs.iter().enumerate() {
        let lineage = if run.parent_workflow_id.is_empty() {
            String::new()
        } else {
            format!(", fork of {} from phase {}", run.parent_workflow_id, run.fork_phase + 1)
        };
        let usage = run.total_usage.unwrap_or_default();
        let score = if run.score > 0 {
            format!("{}/10", run.score)
        } else {
            "-".into()
        };
        out.push_str(&format!(
            "{}  {}  {}{lineage}  score {score}  {} tokens  ${:.4}\n",
            letter(i),
            run.workflow_id,
            status_name(run.status()),
            usage.total_tokens,
            usage.cost_usd
        ));
    }
    for phase in &comparison.phases {
        let verdict = if phase.identical { "same" } else { "differs" };
        out.push_str(&format!("\nphase {} {} ({verdict})\n", phase.index + 1, phase.phase));
        for (i, run) in phase.runs.iter().enumerate() {
            let output = match run.group {
                -1 => "no output yet".to_string(),
                group if group as usize == i => format!("output {} ({} bytes)", run.output_sha256, run.output_bytes),
                group => format!("same output as {}", letter(group as usize)),
            };
            let usage = run.usage.unwrap_or_default();
            let mut notes = Vec::new();
            if !run.copied_from.is_empty() {
                notes.push(format!("copied from {}", run.copied_from));
            }
            if run.human_edit {
                notes.push("edited by a person".into());
            }
            if run.score > 0 {
                notes.push(format!("score {}/10", run.score));
            }
            let notes = if notes.is_empty() {
                String::new()
            } else {
                format!("  [{}]", notes.join(", "))
            };
            out.push_str(&format!(
                "  {}  {:<28}  {output}  {} tokens  ${:.4}{notes}\n",
                letter(i),
                run.model,
                usage.total_tokens,
                usage.cost_usd
            ));
        }
    }
    out
}

fn status_name(status: WorkflowStatus) -> String {
    status
        .as_str_name()
        .trim_start_matches("WORKFLOW_STATUS_")
        .to_lowercase()
}
