//! The state machine's Lua scripts, loaded once and run by SHA (`EVALSHA`,
//! falling back to `EVAL` after a Redis restart flushed the script cache).
//! Scripts that end a workflow start with the shared `ending.lua`
//! (`nexus_pipeline::transition::ENDING_LUA`).

use redis::Script;
use std::sync::LazyLock;

fn ending(body: &str) -> Script {
    Script::new(&format!("{}{body}", nexus_pipeline::transition::ENDING_LUA))
}

pub static CREATE_WORKFLOW: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/create_workflow.lua")));
pub static WATCH_WORKFLOW: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/watch_workflow.lua")));
pub static CANCEL_WORKFLOW: LazyLock<Script> = LazyLock::new(|| ending(include_str!("lua/cancel_workflow.lua")));
/// The gate scripts start with `gate.lua`, their shared fence.
const GATE_LUA: &str = include_str!("lua/gate.lua");

pub static APPROVE_STEP: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{GATE_LUA}{}", include_str!("lua/approve_step.lua"))));
pub static REJECT_STEP: LazyLock<Script> =
    LazyLock::new(|| ending(&format!("{GATE_LUA}{}", include_str!("lua/reject_step.lua"))));
