//! Building the events stored in a workflow's event stream.

use nexus_proto::v1::{WorkflowEvent, workflow_event::Kind};

pub use nexus_pipeline::transition::event;

pub use nexus_proto::timestamp_from_ms as timestamp;

/// Whether the event ends the workflow's stream.
pub fn is_terminal(event: &WorkflowEvent) -> bool {
    matches!(
        event.kind,
        Some(Kind::Completed(_) | Kind::Failed(_) | Kind::Cancelled(_))
    )
}
