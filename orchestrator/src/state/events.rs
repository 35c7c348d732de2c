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

/// Opens a watch of a workflow: its status and its last event's id ("" for
/// none), or `None` when it does not exist. A run still going is marked
/// watched first, so its new events are announced from then on
/// (`watch_workflow.lua`); a watcher must read the events only after this.
pub async fn open_watch(
    conn: &mut nexus_pipeline::connection::Connection,
    keys: &nexus_pipeline::keys::WorkflowKeys,
) -> redis::RedisResult<Option<(String, String)>> {
    let reply: Vec<String> = super::scripts::WATCH_WORKFLOW
        .key(keys.state())
        .key(keys.events())
        .invoke_async(conn)
        .await?;
    let mut reply = reply.into_iter();
    Ok(reply.next().map(|status| (status, reply.next().unwrap_or_default())))
}
