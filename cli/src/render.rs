//! How the CLI prints workflows and their events for a person.

use nexus_proto::v1::workflow_event::Kind;
use nexus_proto::v1::{ListPipelinesResponse, ListWorkflowsResponse, Rating, Usage, Workflow, WorkflowEvent};
use std::io::Write;

/// Prints events as they arrive, streaming each phase's text inline.
pub struct EventPrinter {
    cursors: bool,
    phases: usize,
    streaming: Option<(u32, u32, u32)>,
    /// The phase whose reasoning is being printed.
    thinking: Option<u32>,
}

impl EventPrinter {
    pub fn new(cursors: bool) -> Self {
        Self {
            cursors,
            phases: 0,
            streaming: None,
            thinking: None,
        }
    }

    pub fn print(&mut self, event: &WorkflowEvent) {
        if self.cursors && !matches!(event.kind, Some(Kind::PhaseOutputDelta(_))) {
            println!("[cursor {}]", event.cursor);
        }
        match &event.kind {
            Some(Kind::Accepted(accepted)) => {
                self.phases = accepted.phases.len();
                println!(
                    "accepted: {:?}, pipeline {} with {} phases",
                    accepted.plan_name, accepted.pipeline, self.phases
                );
            }
            Some(Kind::PhaseStarted(started)) => {
                self.streaming = None;
                let redelivery = if started.delivery > 1 {
                    format!(" (delivery {})", started.delivery)
                } else {
                    String::new()
                };
                println!(
                    "\n── phase {}/{} {} · {}{redelivery} ──",
                    started.index + 1,
                    self.phases,
                    started.phase,
                    started.model
                );
            }
            Some(Kind::PhaseOutputDelta(delta)) => {
                let key = (delta.index, delta.delivery, delta.r#try);
                if self.streaming.is_some_and(|current| current != key) {
                    println!("\n[try {} of {}]", delta.r#try, delta.phase);
                }
                if self.thinking.take().is_some() {
                    println!();
                }
                self.streaming = Some(key);
                print!("{}", delta.text);
                let _ = std::io::stdout().flush();
            }
            Some(Kind::PhaseReasoningDelta(thinking)) => {
                if self.thinking != Some(thinking.index) {
                    print!("\n(thinking) ");
                    self.thinking = Some(thinking.index);
                }
                print!("{}", thinking.text);
                let _ = std::io::stdout().flush();
            }
            Some(Kind::PhaseFallback(fallback)) => {
                println!(
                    "\n⇢ {}: {} failed ({}); falling back to {}",
                    fallback.phase, fallback.from_model, fallback.reason, fallback.to_model
                );
            }
            Some(Kind::PhaseRetrying(retry)) => {
                println!(
                    "\n↻ {} try {} failed: {} — retrying in {:.1} s",
                    retry.phase,
                    retry.r#try,
                    retry.reason,
                    retry.retry_in_ms as f64 / 1000.0
                );
            }
            Some(Kind::PhaseWaiting(waiting)) => {
                println!(
                    "\n… {} waits {:.1} s: {}",
                    waiting.phase,
                    waiting.wait_ms as f64 / 1000.0,
                    waiting.reason
                );
            }
            Some(Kind::PhaseCompleted(done)) if done.cache_hit => {
                println!(
                    "\n✓ {} answered from the cache · saved ${:.4}",
                    done.phase, done.saved_usd
                );
            }
            Some(Kind::PhaseCompleted(done)) => {
                println!(
                    "\n✓ {} done in {:.1} s · {}",
                    done.phase,
                    done.duration_ms as f64 / 1000.0,
                    usage(done.usage.as_ref())
                );
            }
            Some(Kind::Completed(finished)) => {
                println!("\n════ FINAL PLAN ════\n{}", finished.final_plan);
                print_rating(finished.rating.as_ref());
                println!("total: {}", usage(finished.total_usage.as_ref()));
            }
            Some(Kind::Failed(failed)) => println!("\n✗ workflow failed: {}", failed.reason),
            Some(Kind::Cancelled(cancelled)) => println!("\n■ workflow cancelled: {}", cancelled.reason),
            None => {}
        }
    }
}

fn usage(usage: Option<&Usage>) -> String {
    let usage = usage.copied().unwrap_or_default();
    format!(
        "{} prompt + {} completion tokens · ${:.4}",
        usage.prompt_tokens, usage.completion_tokens, usage.cost_usd
    )
}

fn print_rating(rating: Option<&Rating>) {
    let Some(rating) = rating else { return };
    println!("\n════ RATING: {}/10 ════", rating.score);
    rating.reasons.iter().for_each(|reason| println!("- {reason}"));
}

pub fn workflow(workflow: &Workflow) {
    println!(
        "{}  {:?}  {:?}",
        workflow.workflow_id,
        workflow.status(),
        workflow.plan.as_ref().map(|p| p.name.as_str()).unwrap_or_default()
    );
    println!("pipeline: {}", workflow.pipeline);
    if !workflow.instructions.is_empty() {
        println!("instructions: {}", workflow.instructions);
    }
    if let Some(budget) = &workflow.budget {
        println!(
            "budget: ${:.4} of ${:.4} spent, ${:.4} left",
            budget.spent_usd, budget.max_cost_usd, budget.remaining_usd
        );
    }
    for phase in &workflow.phases {
        println!(
            "  {}. {:<16} {:<32} {:?}  {}",
            phase.index + 1,
            phase.name,
            phase.model,
            phase.status(),
            usage(phase.usage.as_ref())
        );
    }
    if !workflow.reason.is_empty() {
        println!("reason: {}", workflow.reason);
    }
    if !workflow.final_plan.is_empty() {
        println!("\n════ FINAL PLAN ════\n{}", workflow.final_plan);
    }
    print_rating(workflow.rating.as_ref());
    println!("total: {}", usage(workflow.total_usage.as_ref()));
}

pub fn pipelines(response: &ListPipelinesResponse) {
    for pipeline in &response.pipelines {
        let default = if pipeline.is_default { "  (default)" } else { "" };
        println!("{}{default}", pipeline.name);
        println!("  phases: {}", pipeline.phases.join(" → "));
        let mut models: Vec<_> = pipeline.models.iter().collect();
        models.sort();
        for (role, model) in models {
            println!("  {role}: {model}");
        }
    }
}

pub fn list(page: &ListWorkflowsResponse) {
    for workflow in &page.workflows {
        let name = workflow.plan.as_ref().map(|p| p.name.as_str()).unwrap_or_default();
        let score = workflow
            .rating
            .as_ref()
            .map(|r| format!("{}/10", r.score))
            .unwrap_or_default();
        println!(
            "{}  {:<10?} {:<6} {name}",
            workflow.workflow_id,
            workflow.status(),
            score
        );
    }
    if !page.next_page_token.is_empty() {
        println!("more: --page-token {}", page.next_page_token);
    }
}
