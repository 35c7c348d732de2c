//! Checks on what clients send, before anything touches Redis.

use crate::errors::ApiError;
use nexus_proto::v1::{ProjectPlan, StartWorkflowRequest};

pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_FIELDS: usize = 50;
pub const MAX_FIELD_KEY_CHARS: usize = 64;
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;
pub const MAX_PAGE_SIZE: u32 = 100;
pub const DEFAULT_PAGE_SIZE: u32 = 20;

/// A start request that passed validation.
pub struct ValidStart<'a> {
    pub plan: &'a ProjectPlan,
    pub idempotency_key: Option<&'a str>,
}

pub fn validate_start(request: &StartWorkflowRequest, max_plan_bytes: usize) -> Result<ValidStart<'_>, ApiError> {
    let plan = request.plan.as_ref().ok_or_else(|| invalid("plan is required"))?;
    validate_plan(plan, max_plan_bytes)?;
    let key = request.idempotency_key.as_str();
    if key.len() > MAX_IDEMPOTENCY_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(format!(
            "idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters without spaces"
        )));
    }
    Ok(ValidStart {
        plan,
        idempotency_key: (!key.is_empty()).then_some(key),
    })
}

fn validate_plan(plan: &ProjectPlan, max_plan_bytes: usize) -> Result<(), ApiError> {
    let name = plan.name.trim();
    if name.is_empty() {
        return Err(invalid("plan.name is required"));
    }
    if name.chars().count() > MAX_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(invalid(format!(
            "plan.name must be at most {MAX_NAME_CHARS} characters with no control characters"
        )));
    }
    if plan.description.trim().is_empty() {
        return Err(invalid(
            "plan.description is required: the plan's text must not be empty",
        ));
    }
    validate_fields(plan)?;
    let size = plan_bytes(plan);
    if size > max_plan_bytes {
        return Err(ApiError::TooLarge(format!(
            "plan is {size} bytes (description plus fields); the limit is {max_plan_bytes} bytes"
        )));
    }
    Ok(())
}

fn validate_fields(plan: &ProjectPlan) -> Result<(), ApiError> {
    if plan.fields.len() > MAX_FIELDS {
        return Err(invalid(format!(
            "plan.fields has {} entries; at most {MAX_FIELDS} are allowed",
            plan.fields.len()
        )));
    }
    let bad_key = plan.fields.keys().find(|key| {
        key.trim().is_empty() || key.chars().count() > MAX_FIELD_KEY_CHARS || key.chars().any(char::is_control)
    });
    match bad_key {
        Some(key) => Err(invalid(format!(
            "plan.fields key {:?} must be 1 to {MAX_FIELD_KEY_CHARS} characters with no control characters",
            key.chars().take(80).collect::<String>()
        ))),
        None => Ok(()),
    }
}

fn plan_bytes(plan: &ProjectPlan) -> usize {
    plan.description.len() + plan.fields.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
}

/// A stream cursor is a Redis stream id, `<ms>-<seq>`, each part a 64-bit
/// unsigned number (anything larger is no id Redis can hold).
pub fn validate_cursor(cursor: &str) -> Result<(), ApiError> {
    if cursor.is_empty() || parse_cursor(cursor).is_some() {
        Ok(())
    } else {
        Err(invalid(format!(
            "after_cursor {:?} is not a cursor from this workflow's events",
            cursor.chars().take(80).collect::<String>()
        )))
    }
}

/// A stream id as comparable (milliseconds, sequence); `None` when it is
/// not one.
pub fn parse_cursor(cursor: &str) -> Option<(u64, u64)> {
    let (ms, seq) = cursor.split_once('-')?;
    Some((parse_u64(ms)?, parse_u64(seq)?))
}

fn parse_u64(text: &str) -> Option<u64> {
    text.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| text.parse().ok())
        .flatten()
}

pub fn page_size(requested: u32) -> Result<usize, ApiError> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE as usize),
        1..=MAX_PAGE_SIZE => Ok(requested as usize),
        _ => Err(invalid(format!("page_size must be at most {MAX_PAGE_SIZE}"))),
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::InvalidArgument(message.into())
}

/// A fingerprint of the plan that does not depend on the order in which its
/// `fields` map arrived (protobuf encodes maps in no fixed order, and a
/// client's retry may send them in another): name, description and the
/// fields sorted by key, each length-prefixed so no two plans collide by
/// concatenation.
pub fn plan_fingerprint(plan: &ProjectPlan) -> String {
    let mut canonical = Vec::with_capacity(plan_bytes(plan) + plan.name.len() + 16 * (plan.fields.len() + 2));
    let mut push = |text: &str| {
        canonical.extend_from_slice(&(text.len() as u64).to_le_bytes());
        canonical.extend_from_slice(text.as_bytes());
    };
    push(&plan.name);
    push(&plan.description);
    let mut fields: Vec<_> = plan.fields.iter().collect();
    fields.sort();
    for (key, value) in fields {
        push(key);
        push(value);
    }
    format!("{:016x}", nexus_pipeline::ids::fnv1a(&canonical))
}

/// The plan as the models see it: name, description, then "key: value" lines.
pub fn plan_as_text(plan: &ProjectPlan) -> String {
    let mut text = format!("Project: {}\n\n{}\n", plan.name.trim(), plan.description.trim());
    let mut fields: Vec<_> = plan.fields.iter().collect();
    fields.sort();
    for (key, value) in fields {
        text.push_str(&format!("\n{}: {}", key.trim(), value.trim()));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(description: &str) -> StartWorkflowRequest {
        StartWorkflowRequest {
            plan: Some(ProjectPlan {
                name: "Shop".into(),
                description: description.into(),
                ..Default::default()
            }),
            idempotency_key: String::new(),
        }
    }

    #[test]
    fn empty_description_is_invalid() {
        assert!(matches!(
            validate_start(&request("  "), 100),
            Err(ApiError::InvalidArgument(_))
        ));
    }

    #[test]
    fn oversized_plan_names_its_size_and_the_limit() {
        let Err(ApiError::TooLarge(message)) = validate_start(&request(&"x".repeat(101)), 100) else {
            panic!("expected TooLarge");
        };
        assert!(message.contains("101") && message.contains("100"), "{message}");
    }

    #[test]
    fn plan_fingerprint_ignores_field_order_but_not_content() {
        let plan = |pairs: &[(&str, &str)]| ProjectPlan {
            name: "Shop".into(),
            description: "d".into(),
            fields: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        let forward = plan(&[("a", "1"), ("b", "2"), ("c", "3")]);
        let backward = plan(&[("c", "3"), ("b", "2"), ("a", "1")]);
        assert_eq!(plan_fingerprint(&forward), plan_fingerprint(&backward));
        assert_ne!(
            plan_fingerprint(&forward),
            plan_fingerprint(&plan(&[("a", "1"), ("b", "23")]))
        );
        assert_ne!(
            plan_fingerprint(&plan(&[("ab", "")])),
            plan_fingerprint(&plan(&[("a", "b")]))
        );
    }

    #[test]
    fn cursors_are_stream_ids() {
        assert!(validate_cursor("").is_ok());
        assert!(validate_cursor("1700000000000-3").is_ok());
        assert!(validate_cursor("abc").is_err());
        assert!(validate_cursor("1-").is_err());
        assert!(validate_cursor("+1-0").is_err());
        assert!(validate_cursor("18446744073709551615-18446744073709551615").is_ok());
        assert!(validate_cursor("99999999999999999999-0").is_err());
    }
}
