//! `nexus get --format json`: the `Workflow` message as JSON, for scripts.
//!
//! It is the proto3 JSON mapping with the proto's own field names
//! (`workflow_id`, not `workflowId`: what protojson calls `UseProtoNames`),
//! every field present even when empty, enums by their proto names
//! (`WORKFLOW_STATUS_COMPLETED`), timestamps in RFC 3339 and 64-bit integers
//! as JSON numbers (proto3 JSON parsers accept numbers as well as strings,
//! and token counts stay far below 2^53). So any proto3 JSON parser reads it
//! back as a `Workflow`.
//!
//! The mapping is spelled out here rather than generated (`pbjson`): the
//! generated types derive no serde, and one explicit function is smaller
//! than a second code generator in the contract crate's build.

use nexus_proto::v1::{Budget, Phase, ProjectPlan, Rating, Usage, Workflow};
use serde_json::{Value, json};

pub fn workflow(workflow: &Workflow) -> Value {
    json!({
        "workflow_id": workflow.workflow_id,
        "status": workflow.status().as_str_name(),
        "plan": workflow.plan.as_ref().map(plan),
        "created_at": workflow.created_at.as_ref().map(timestamp),
        "updated_at": workflow.updated_at.as_ref().map(timestamp),
        "phases": workflow.phases.iter().map(phase).collect::<Vec<_>>(),
        "final_plan": workflow.final_plan,
        "rating": workflow.rating.as_ref().map(rating),
        "total_usage": workflow.total_usage.as_ref().map(usage),
        "reason": workflow.reason,
        "idempotency_key": workflow.idempotency_key,
        "pipeline": workflow.pipeline,
        "models": workflow.models,
        "instructions": workflow.instructions,
        "budget": workflow.budget.as_ref().map(budget),
    })
}

fn plan(plan: &ProjectPlan) -> Value {
    json!({
        "name": plan.name,
        "description": plan.description,
        "fields": plan.fields,
    })
}

fn phase(phase: &Phase) -> Value {
    json!({
        "index": phase.index,
        "name": phase.name,
        "model": phase.model,
        "status": phase.status().as_str_name(),
        "output": phase.output,
        "usage": phase.usage.as_ref().map(usage),
        "duration_ms": phase.duration_ms,
        "tries": phase.tries,
        "finish_reason": phase.finish_reason,
        "generation_id": phase.generation_id,
        "cache_hit": phase.cache_hit,
        "saved_usd": phase.saved_usd,
        "requested_model": phase.requested_model,
    })
}

fn usage(usage: &Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "cost_usd": usage.cost_usd,
        "cached_prompt_tokens": usage.cached_prompt_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
    })
}

fn rating(rating: &Rating) -> Value {
    json!({ "score": rating.score, "reasons": rating.reasons })
}

fn budget(budget: &Budget) -> Value {
    json!({
        "max_cost_usd": budget.max_cost_usd,
        "spent_usd": budget.spent_usd,
        "remaining_usd": budget.remaining_usd,
    })
}

/// RFC 3339 in UTC with 0, 3, 6 or 9 fractional digits, as the proto3 JSON
/// mapping writes a `google.protobuf.Timestamp`.
pub(crate) fn timestamp(time: &prost_types::Timestamp) -> String {
    let days = time.seconds.div_euclid(86_400);
    let second_of_day = time.seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (second_of_day / 3600, second_of_day / 60 % 60, second_of_day % 60);
    let nanos = time.nanos.clamp(0, 999_999_999);
    let fraction = match nanos {
        0 => String::new(),
        n if n % 1_000_000 == 0 => format!(".{:03}", n / 1_000_000),
        n if n % 1_000 == 0 => format!(".{:06}", n / 1_000),
        n => format!(".{n:09}"),
    };
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}{fraction}Z")
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64, nanos: i32) -> String {
        timestamp(&prost_types::Timestamp { seconds, nanos })
    }

    #[test]
    fn timestamps_are_rfc_3339_in_utc_with_the_digits_they_need() {
        assert_eq!(at(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400, 0), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_732_612_345, 678_000_000), "2024-11-26T09:12:25.678Z");
        assert_eq!(at(1_732_612_345, 678_900_000), "2024-11-26T09:12:25.678900Z");
        assert_eq!(at(4_102_444_799, 1), "2099-12-31T23:59:59.000000001Z");
        assert_eq!(at(-1, 0), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn every_field_is_present_under_its_proto_name() {
        let value = workflow(&Workflow {
            workflow_id: "wf_0_x".into(),
            phases: vec![Phase::default()],
            ..Default::default()
        });
        assert_eq!(value["status"], "WORKFLOW_STATUS_UNSPECIFIED");
        assert_eq!(value["phases"][0]["status"], "PHASE_STATUS_UNSPECIFIED");
        assert_eq!(value.as_object().unwrap().len(), 15, "Workflow has 15 fields");
        assert_eq!(value["phases"][0].as_object().unwrap().len(), 13, "Phase has 13 fields");
        assert!(value["rating"].is_null() && value["final_plan"] == "");
    }
}
