//! How the CLI prints workflows and their events for a person.
//!
//! Events read differently on a terminal and anywhere else. A terminal gets
//! each phase's text as it streams, a partial line at a time, with colour
//! (unless `NO_COLOR` is set or `TERM` is `dumb`). A pipe, a file or a CI
//! log gets plain lines: no escape codes, no carriage returns, every event
//! on a line of its own and streamed text written only once its line is
//! whole, so `grep`, `tail -f` and log collectors see one thing per line.

use nexus_proto::v1::workflow_event::Kind;
use nexus_proto::v1::{ListPipelinesResponse, ListWorkflowsResponse, Rating, Usage, Workflow, WorkflowEvent};
use std::borrow::Cow;
use std::io::{IsTerminal, Write};

/// How events are written to one stream.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Style {
    Terminal { color: bool },
    Plain,
}

impl Style {
    /// The style for `stream`: a terminal's, when it is one.
    pub fn of(stream: &impl IsTerminal) -> Self {
        if !stream.is_terminal() {
            return Style::Plain;
        }
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty());
        let dumb = std::env::var_os("TERM").is_some_and(|term| term == "dumb");
        Style::Terminal {
            color: !no_color && !dumb,
        }
    }
}

/// SGR colours for a terminal; nothing anywhere else.
#[derive(Clone, Copy)]
enum Paint {
    Bold,
    Dim,
    Green,
    Red,
    Yellow,
    Cyan,
}

impl Paint {
    fn code(self) -> &'static str {
        match self {
            Paint::Bold => "1",
            Paint::Dim => "2",
            Paint::Green => "32",
            Paint::Red => "31",
            Paint::Yellow => "33",
            Paint::Cyan => "1;36",
        }
    }
}

/// Prints events as they arrive, streaming each phase's text.
pub struct EventPrinter<W: Write> {
    out: W,
    style: Style,
    cursors: bool,
    phases: usize,
    streaming: Option<(u32, u32, u32)>,
    /// The phase whose reasoning is being printed.
    thinking: Option<u32>,
    /// Terminal: streamed text left a line open.
    mid_line: bool,
    /// Plain: streamed text after its last line end, held until the line is
    /// whole (or the next event ends it).
    held: String,
}

impl<W: Write> EventPrinter<W> {
    pub fn new(out: W, style: Style, cursors: bool) -> Self {
        Self {
            out,
            style,
            cursors,
            phases: 0,
            streaming: None,
            thinking: None,
            mid_line: false,
            held: String::new(),
        }
    }

    /// A line of the command's own (not an event), in the events' stream.
    pub fn note(&mut self, text: &str) {
        self.line(None, text);
    }

    /// Ends streamed text left open; call when the stream ends.
    pub fn finish(&mut self) {
        self.end_text();
        let _ = self.out.flush();
    }

    pub fn print(&mut self, event: &WorkflowEvent) {
        if self.cursors && !matches!(event.kind, Some(Kind::PhaseOutputDelta(_))) {
            self.line(Some(Paint::Dim), &format!("[cursor {}]", event.cursor));
        }
        match &event.kind {
            Some(Kind::Accepted(accepted)) => {
                self.phases = accepted.phases.len();
                let text = format!(
                    "accepted: {:?}, pipeline {} with {} phases",
                    accepted.plan_name, accepted.pipeline, self.phases
                );
                self.line(None, &text);
            }
            Some(Kind::PhaseStarted(started)) => {
                self.streaming = None;
                let redelivery = if started.delivery > 1 {
                    format!(" (delivery {})", started.delivery)
                } else {
                    String::new()
                };
                let text = format!(
                    "── phase {}/{} {} · {}{redelivery} ──",
                    started.index + 1,
                    self.phases,
                    started.phase,
                    started.model
                );
                self.block(Some(Paint::Cyan), &text);
            }
            Some(Kind::PhaseOutputDelta(delta)) => {
                let key = (delta.index, delta.delivery, delta.r#try);
                if self.streaming.is_some_and(|current| current != key) {
                    self.block(None, &format!("[try {} of {}]", delta.r#try, delta.phase));
                }
                if self.thinking.take().is_some() {
                    self.end_text();
                }
                self.streaming = Some(key);
                self.text(None, &delta.text);
            }
            Some(Kind::PhaseReasoningDelta(thinking)) => {
                if self.thinking != Some(thinking.index) {
                    self.open_text(Some(Paint::Dim), "(thinking) ");
                    self.thinking = Some(thinking.index);
                }
                self.text(Some(Paint::Dim), &thinking.text);
            }
            Some(Kind::PhaseFallback(fallback)) => {
                let text = format!(
                    "⇢ {}: {} failed ({}); falling back to {}",
                    fallback.phase, fallback.from_model, fallback.reason, fallback.to_model
                );
                self.block(Some(Paint::Yellow), &text);
            }
            Some(Kind::PhaseRetrying(retry)) => {
                let text = format!(
                    "↻ {} try {} failed: {} — retrying in {:.1} s",
                    retry.phase,
                    retry.r#try,
                    retry.reason,
                    retry.retry_in_ms as f64 / 1000.0
                );
                self.block(Some(Paint::Yellow), &text);
            }
            Some(Kind::PhaseWaiting(waiting)) => {
                let text = format!(
                    "… {} waits {:.1} s: {}",
                    waiting.phase,
                    waiting.wait_ms as f64 / 1000.0,
                    waiting.reason
                );
                self.block(Some(Paint::Yellow), &text);
            }
            Some(Kind::PhaseCompleted(done)) if !done.copied_from.is_empty() => {
                let text = format!("✓ {} copied from {}", done.phase, done.copied_from);
                self.block(Some(Paint::Green), &text);
            }
            Some(Kind::PhaseAwaitingApproval(gate)) => {
                let id = &event.workflow_id;
                let text = format!(
                    "⏸ waiting for approval of {} — `nexus approve {id} {}` (optionally --edit FILE) or `nexus reject {id} {} --reason ...`; on timeout: {}",
                    gate.phase, gate.index, gate.index, gate.on_timeout
                );
                self.block(Some(Paint::Yellow), &text);
            }
            Some(Kind::PhaseApproved(approved)) => {
                let how = match (approved.timed_out, approved.edited_output.is_some()) {
                    (true, _) => "approved by its timeout",
                    (false, true) => "approved with an edited output",
                    (false, false) => "approved",
                };
                let comment = if approved.comment.is_empty() {
                    String::new()
                } else {
                    format!(": {}", approved.comment)
                };
                self.block(Some(Paint::Green), &format!("▶ {} {how}{comment}", approved.phase));
            }
            Some(Kind::PhaseCompleted(done)) if done.cache_hit => {
                let text = format!(
                    "✓ {} answered from the cache · saved ${:.4}",
                    done.phase, done.saved_usd
                );
                self.block(Some(Paint::Green), &text);
            }
            Some(Kind::PhaseCompleted(done)) => {
                let text = format!(
                    "✓ {} done in {:.1} s · {}",
                    done.phase,
                    done.duration_ms as f64 / 1000.0,
                    usage(done.usage.as_ref())
                );
                self.block(Some(Paint::Green), &text);
            }
            Some(Kind::Completed(finished)) => {
                self.block(Some(Paint::Bold), "════ FINAL PLAN ════");
                if finished.final_plan_omitted {
                    let note = format!(
                        "({} bytes, streamed above; `nexus get {} --format md` prints it)",
                        finished.final_plan_bytes, event.workflow_id
                    );
                    self.line(None, &note);
                } else {
                    self.line(None, &finished.final_plan);
                }
                if let Some(rating) = &finished.rating {
                    self.block(Some(Paint::Bold), &rating_heading(rating));
                    for reason in &rating.reasons {
                        self.line(None, &format!("- {reason}"));
                    }
                }
                self.line(None, &format!("total: {}", usage(finished.total_usage.as_ref())));
            }
            Some(Kind::Failed(failed)) => {
                self.block(Some(Paint::Red), &format!("✗ workflow failed: {}", failed.reason));
            }
            Some(Kind::Cancelled(cancelled)) => {
                self.block(
                    Some(Paint::Yellow),
                    &format!("■ workflow cancelled: {}", cancelled.reason),
                );
            }
            None => {}
        }
    }

    fn paint<'a>(&self, paint: Option<Paint>, text: &'a str) -> Cow<'a, str> {
        match (self.style, paint) {
            (Style::Terminal { color: true }, Some(paint)) if !text.is_empty() => {
                Cow::Owned(format!("\x1b[{}m{text}\x1b[0m", paint.code()))
            }
            _ => Cow::Borrowed(text),
        }
    }

    /// Streamed text: on a terminal as it comes, elsewhere a whole line at
    /// a time.
    fn text(&mut self, paint: Option<Paint>, text: &str) {
        match self.style {
            Style::Terminal { .. } => {
                let painted = self.paint(paint, text).into_owned();
                let _ = write!(self.out, "{painted}");
                let _ = self.out.flush();
                if !text.is_empty() {
                    self.mid_line = !text.ends_with('\n');
                }
            }
            Style::Plain => {
                self.held.push_str(text);
                if let Some(end) = self.held.rfind('\n') {
                    let lines: String = self.held.drain(..=end).collect();
                    let _ = self.out.write_all(lines.as_bytes());
                }
            }
        }
    }

    /// Starts streamed text on a new line, with a label.
    fn open_text(&mut self, paint: Option<Paint>, label: &str) {
        match self.style {
            Style::Terminal { .. } => {
                let painted = self.paint(paint, label).into_owned();
                let _ = write!(self.out, "\n{painted}");
                self.mid_line = true;
            }
            Style::Plain => {
                self.end_text();
                self.held.push_str(label);
            }
        }
    }

    /// Ends the line streamed text left open, if it did.
    fn end_text(&mut self) {
        match self.style {
            Style::Terminal { .. } => {
                if std::mem::take(&mut self.mid_line) {
                    let _ = writeln!(self.out);
                }
            }
            Style::Plain => {
                if !self.held.is_empty() {
                    let rest = std::mem::take(&mut self.held);
                    let _ = writeln!(self.out, "{rest}");
                }
            }
        }
    }

    /// A line of its own.
    fn line(&mut self, paint: Option<Paint>, text: &str) {
        self.end_text();
        let painted = self.paint(paint, text).into_owned();
        let _ = writeln!(self.out, "{painted}");
    }

    /// A line set apart: on a terminal after a line break (a blank line
    /// unless streamed text was open), elsewhere simply the next line.
    fn block(&mut self, paint: Option<Paint>, text: &str) {
        if let Style::Terminal { .. } = self.style {
            self.mid_line = false;
            let _ = writeln!(self.out);
        }
        self.line(paint, text);
    }
}

fn usage(usage: Option<&Usage>) -> String {
    let usage = usage.copied().unwrap_or_default();
    format!(
        "{} prompt + {} completion tokens · ${:.4}",
        usage.prompt_tokens, usage.completion_tokens, usage.cost_usd
    )
}

fn rating_heading(rating: &Rating) -> String {
    format!("════ RATING: {}/10 ════", rating.score)
}

fn print_rating(rating: Option<&Rating>) {
    let Some(rating) = rating else { return };
    println!("\n{}", rating_heading(rating));
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

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_proto::v1::{PhaseCompleted, PhaseOutputDelta, PhaseReasoningDelta, PhaseStarted};

    fn event(kind: Kind) -> WorkflowEvent {
        WorkflowEvent {
            kind: Some(kind),
            ..Default::default()
        }
    }

    fn delta(text: &str) -> WorkflowEvent {
        event(Kind::PhaseOutputDelta(PhaseOutputDelta {
            text: text.into(),
            delivery: 1,
            r#try: 1,
            ..Default::default()
        }))
    }

    /// A reviewer's phase: started, reasons, streams its answer in pieces
    /// that split lines anywhere, completes.
    fn phase_events() -> Vec<WorkflowEvent> {
        vec![
            event(Kind::PhaseStarted(PhaseStarted {
                phase: "feedback".into(),
                model: "m/x".into(),
                ..Default::default()
            })),
            event(Kind::PhaseReasoningDelta(PhaseReasoningDelta {
                text: "weighing".into(),
                ..Default::default()
            })),
            delta("Too ex"),
            delta("pensive.\nCut sc"),
            delta("ope."),
            event(Kind::PhaseCompleted(PhaseCompleted {
                phase: "feedback".into(),
                duration_ms: 1200,
                ..Default::default()
            })),
        ]
    }

    fn printed(style: Style) -> String {
        let mut printer = EventPrinter::new(Vec::new(), style, false);
        phase_events().iter().for_each(|event| printer.print(event));
        printer.finish();
        String::from_utf8(printer.out).unwrap()
    }

    #[test]
    fn plain_output_is_whole_lines_one_per_event_without_escapes() {
        assert_eq!(
            printed(Style::Plain),
            "── phase 1/0 feedback · m/x ──\n\
             (thinking) weighing\n\
             Too expensive.\n\
             Cut scope.\n\
             ✓ feedback done in 1.2 s · 0 prompt + 0 completion tokens · $0.0000\n"
        );
    }

    #[test]
    fn a_terminal_gets_the_same_text_streamed_and_coloured() {
        let coloured = printed(Style::Terminal { color: true });
        assert!(coloured.contains("\x1b[2m(thinking) \x1b[0m\x1b[2mweighing\x1b[0m\nToo expensive.\nCut scope.\n"));
        assert!(coloured.contains("\x1b[32m✓ feedback done"), "{coloured:?}");
        let uncoloured = printed(Style::Terminal { color: false });
        assert_eq!(
            uncoloured,
            "\n── phase 1/0 feedback · m/x ──\n\
             \n(thinking) weighing\n\
             Too expensive.\n\
             Cut scope.\n\
             ✓ feedback done in 1.2 s · 0 prompt + 0 completion tokens · $0.0000\n"
        );
    }
}
