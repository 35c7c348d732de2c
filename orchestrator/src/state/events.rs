//! Building the events stored in a workflow's event stream.

use nexus_proto::v1::{WorkflowEvent, workflow_event::Kind};

/// An event as stored: the cursor and workflow id are filled in when it is
/// read back (the cursor is its stream id; the id is implied by the stream).
pub fn event(kind: Kind) -> WorkflowEvent {
    WorkflowEvent {
        cursor: String::new(),
        workflow_id: String::new(),
        time: Some(nexus_proto::timestamp_now()),
        kind: Some(kind),
    }
}

pub use nexus_proto::timestamp_from_ms as timestamp;

/// Whether the event ends the workflow's stream.
pub fn is_terminal(event: &WorkflowEvent) -> bool {
    matches!(
        event.kind,
        Some(Kind::Completed(_) | Kind::Failed(_) | Kind::Cancelled(_))
    )
}
