//! A workflow as a Markdown document: what `nexus run` writes at the end and
//! `nexus get --format md` prints, from this one function. A header names
//! the run (status, pipeline, rating, totals, fields), then come the final
//! plan verbatim, the rating with its reasons, and a table of the phases
//! (model, tokens, cost, time).

use nexus_proto::v1::{Phase, Usage, Workflow};
use std::fmt::Write;

pub fn workflow(workflow: &Workflow) -> String {
    let plan = workflow.plan.clone().unwrap_or_default();
    let total = workflow.total_usage.unwrap_or_default();
    let mut md = format!("# {}\n\n", inline(&plan.name));
    let mut item = |label: &str, value: String| {
        let _ = writeln!(md, "- **{label}:** {value}");
    };
    item("Workflow", format!("`{}`", workflow.workflow_id));
    item("Status", short_name(workflow.status().as_str_name()));
    if !workflow.reason.is_empty() {
        item("Reason", inline(&workflow.reason));
    }
    item("Pipeline", inline(&workflow.pipeline));
    if let Some(rating) = &workflow.rating {
        item("Rating", format!("{}/10", rating.score));
    }
    item("Total", totals(&total));
    if !workflow.models.is_empty() {
        item("Models", pairs(workflow.models.iter(), |model| format!("`{model}`")));
    }
    if !workflow.instructions.is_empty() {
        item("Instructions", inline(&workflow.instructions));
    }
    if !plan.fields.is_empty() {
        item("Fields", pairs(plan.fields.iter(), inline));
    }
    if !workflow.final_plan.is_empty() {
        md.push_str("\n## Final plan\n\n");
        md.push_str(&workflow.final_plan);
        if !workflow.final_plan.ends_with('\n') {
            md.push('\n');
        }
    }
    if let Some(rating) = &workflow.rating {
        let _ = writeln!(md, "\n## Rating: {}/10\n", rating.score);
        for reason in &rating.reasons {
            let _ = writeln!(md, "- {}", inline(reason));
        }
    }
    md.push_str("\n## Phases\n\n");
    md.push_str("| # | Phase | Model | Status | Prompt tokens | Completion tokens | Cost (USD) | Time |\n");
    md.push_str("|--:|:--|:--|:--|--:|--:|--:|--:|\n");
    for phase in &workflow.phases {
        let usage = phase.usage.unwrap_or_default();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {:.4} | {:.1} s |",
            phase.index + 1,
            cell(&phase.name),
            model(phase),
            short_name(phase.status().as_str_name()),
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cost_usd,
            phase.duration_ms as f64 / 1000.0
        );
    }
    let _ = writeln!(
        md,
        "| | **Total** | | | {} | {} | {:.4} | |",
        total.prompt_tokens, total.completion_tokens, total.cost_usd
    );
    md
}

/// "WORKFLOW_STATUS_COMPLETED" → "completed".
pub fn short_name(proto_name: &str) -> String {
    let name = proto_name
        .strip_prefix("WORKFLOW_STATUS_")
        .or_else(|| proto_name.strip_prefix("PHASE_STATUS_"))
        .unwrap_or(proto_name);
    name.to_lowercase()
}

fn totals(usage: &Usage) -> String {
    format!(
        "{} prompt + {} completion tokens, ${:.4}",
        usage.prompt_tokens, usage.completion_tokens, usage.cost_usd
    )
}

/// The model that answered, and why it is not simply the one configured.
fn model(phase: &Phase) -> String {
    let mut text = cell(&phase.model);
    if !phase.requested_model.is_empty() && phase.requested_model != phase.model {
        let _ = write!(text, " (asked for {})", cell(&phase.requested_model));
    }
    if phase.cache_hit {
        let _ = write!(text, " (cached, saved ${:.4})", phase.saved_usd);
    }
    text
}

/// `key: value` pairs in key order, on one line.
fn pairs<'a>(map: impl Iterator<Item = (&'a String, &'a String)>, value: impl Fn(&str) -> String) -> String {
    let mut pairs: Vec<_> = map.collect();
    pairs.sort();
    pairs
        .into_iter()
        .map(|(key, v)| format!("{}: {}", inline(key), value(v)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Text for one line of Markdown: line breaks become spaces.
fn inline(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Text for a table cell: one line, and `|` cannot end the cell.
fn cell(text: &str) -> String {
    inline(text).replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_proto::v1::{PhaseStatus, ProjectPlan, Rating, WorkflowStatus};

    #[test]
    fn a_completed_run_reads_as_plan_rating_and_phase_table() {
        let phase = Phase {
            index: 0,
            name: "rate".into(),
            model: "m/a|b".into(),
            requested_model: "m/first".into(),
            status: PhaseStatus::Completed as i32,
            usage: Some(Usage {
                prompt_tokens: 120,
                completion_tokens: 30,
                cost_usd: 0.0012,
                ..Default::default()
            }),
            duration_ms: 1500,
            ..Default::default()
        };
        let md = workflow(&Workflow {
            workflow_id: "wf_0_x".into(),
            status: WorkflowStatus::Completed as i32,
            plan: Some(ProjectPlan {
                name: "Shop".into(),
                description: "ignored".into(),
                fields: [("budget".to_string(), "50k\nEUR".to_string())].into(),
            }),
            final_plan: "Step 1.\n\nStep 2.".into(),
            rating: Some(Rating {
                score: 7,
                reasons: vec!["clear".into()],
            }),
            total_usage: phase.usage,
            phases: vec![phase],
            pipeline: "quick".into(),
            ..Default::default()
        });
        assert!(
            md.starts_with("# Shop\n\n- **Workflow:** `wf_0_x`\n- **Status:** completed\n"),
            "{md}"
        );
        assert!(md.contains("- **Fields:** budget: 50k EUR\n"), "{md}");
        assert!(
            md.contains("\n## Final plan\n\nStep 1.\n\nStep 2.\n\n## Rating: 7/10\n\n- clear\n"),
            "{md}"
        );
        assert!(
            md.contains("| 1 | rate | m/a\\|b (asked for m/first) | completed | 120 | 30 | 0.0012 | 1.5 s |\n"),
            "{md}"
        );
        assert!(md.ends_with("| | **Total** | | | 120 | 30 | 0.0012 | |\n"), "{md}");
    }

    #[test]
    fn a_failed_run_says_why_and_has_no_plan_section() {
        let md = workflow(&Workflow {
            status: WorkflowStatus::Failed as i32,
            reason: "model said 402".into(),
            ..Default::default()
        });
        assert!(
            md.contains("- **Status:** failed\n- **Reason:** model said 402\n"),
            "{md}"
        );
        assert!(!md.contains("## Final plan") && !md.contains("## Rating"), "{md}");
    }
}
