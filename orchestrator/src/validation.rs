//! Checks on what clients send, before anything touches Redis.

use crate::catalog::{ChosenPipeline, PipelineCatalog};
use crate::errors::ApiError;
use nexus_proto::v1::{ForkWorkflowRequest, ProjectPlan, StartWorkflowRequest};

pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_FIELDS: usize = 50;
pub const MAX_FIELD_KEY_CHARS: usize = 64;
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;
pub const MAX_PAGE_SIZE: u32 = 100;
pub const DEFAULT_PAGE_SIZE: u32 = 20;

/// The server's cost caps, in USD (0: none).
#[derive(Clone, Copy, Debug, Default)]
pub struct CostCaps {
    /// For runs that ask for none.
    pub default_usd: f64,
    /// The most a run may ask for.
    pub max_usd: f64,
}

impl CostCaps {
    /// The cap a run gets (0: none), or why it may not have the one it asked for.
    pub fn for_request(&self, asked: f64) -> Result<f64, ApiError> {
        if !asked.is_finite() || asked < 0.0 {
            return Err(invalid(
                "max_cost_usd must be a non-negative number of USD (0 for the server's default)",
            ));
        }
        if self.max_usd > 0.0 && asked > self.max_usd {
            return Err(invalid(format!(
                "max_cost_usd {asked} is above this server's maximum of {} USD",
                self.max_usd
            )));
        }
        let ceiling = if self.max_usd > 0.0 { self.max_usd } else { f64::MAX };
        Ok(if asked > 0.0 {
            asked
        } else if self.default_usd > 0.0 {
            self.default_usd.min(ceiling)
        } else {
            self.max_usd
        })
    }
}

/// A start request that passed validation.
pub struct ValidStart<'a> {
    pub plan: &'a ProjectPlan,
    pub idempotency_key: Option<&'a str>,
    /// The pipeline as the run's choices resolve it.
    pub pipeline: ChosenPipeline,
    /// What an idempotent retry must repeat: the plan and the run's choices.
    pub fingerprint: String,
    /// For a fork: what it starts with from its parent; empty for a start.
    pub seed: Seed,
    /// The tenant the run belongs to; empty without tenants.
    pub tenant: String,
}

/// What a run starts with besides its plan: nothing for a fresh start; for
/// a fork, the phases copied from its parent and its lineage.
#[derive(Default)]
pub struct Seed {
    /// The first phase the run runs itself.
    pub first_phase: u32,
    /// State hash fields (copied phase records, rating, lineage).
    pub state: Vec<(String, Vec<u8>)>,
    /// Outputs of the copied phases, by phase name.
    pub outputs: Vec<(String, String)>,
    /// Completed events of the copied phases, after the accepted event.
    pub events: Vec<Vec<u8>>,
}

pub fn validate_start<'a>(
    request: &'a StartWorkflowRequest,
    max_plan_bytes: usize,
    catalog: &PipelineCatalog,
    caps: CostCaps,
) -> Result<ValidStart<'a>, ApiError> {
    let plan = request.plan.as_ref().ok_or_else(|| invalid("plan is required"))?;
    validate_plan(plan, max_plan_bytes)?;
    let mut pipeline = catalog.choose(request)?;
    pipeline.choices.max_cost_usd = caps.for_request(request.max_cost_usd)?;
    Ok(ValidStart {
        plan,
        idempotency_key: idempotency_key(&request.idempotency_key)?,
        fingerprint: start_fingerprint(request, plan),
        pipeline,
        seed: Seed::default(),
        tenant: String::new(),
    })
}

/// The idempotency key, `None` when empty, or why it is not a valid one.
pub fn idempotency_key(key: &str) -> Result<Option<&str>, ApiError> {
    if key.len() > MAX_IDEMPOTENCY_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(format!(
            "idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters without spaces"
        )));
    }
    Ok((!key.is_empty()).then_some(key))
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
    let mut canonical = Canonical::default();
    canonical.push_plan(plan);
    canonical.fingerprint()
}

/// [`plan_fingerprint`] extended by the run's choices as the client sent
/// them (pipeline name, model overrides in key order, instructions): a
/// retry with the same key must ask for the same run.
pub fn start_fingerprint(request: &StartWorkflowRequest, plan: &ProjectPlan) -> String {
    let mut canonical = Canonical::default();
    canonical.push_plan(plan);
    let choices = !request.pipeline.trim().is_empty()
        || !request.models.is_empty()
        || !request.instructions.trim().is_empty()
        || request.no_cache
        || request.max_cost_usd != 0.0;
    if choices {
        canonical.push(request.pipeline.trim());
        canonical.push_sorted(&request.models);
        canonical.push(request.instructions.trim());
        canonical.push(if request.no_cache { "no_cache" } else { "" });
        canonical.push(&request.max_cost_usd.to_string());
    }
    canonical.fingerprint()
}

/// What an idempotent retry of a fork must repeat: parent, fork point and
/// overrides.
pub fn fork_fingerprint(request: &ForkWorkflowRequest) -> String {
    let mut canonical = Canonical::default();
    canonical.push("fork");
    canonical.push(request.workflow_id.trim());
    canonical.push(request.from_phase.trim());
    canonical.push_sorted(&request.models);
    canonical.push_sorted(&request.prompts);
    canonical.push(request.instructions.trim());
    canonical.push(if request.no_cache { "no_cache" } else { "" });
    canonical.push(&request.max_cost_usd.to_string());
    canonical.fingerprint()
}

/// Length-prefixed texts, hashed: no two inputs collide by concatenation.
#[derive(Default)]
struct Canonical(Vec<u8>);

impl Canonical {
    fn push(&mut self, text: &str) {
        self.0.extend_from_slice(&(text.len() as u64).to_le_bytes());
        self.0.extend_from_slice(text.as_bytes());
    }

    fn push_sorted(&mut self, pairs: &std::collections::HashMap<String, String>) {
        let mut pairs: Vec<_> = pairs.iter().collect();
        pairs.sort();
        for (key, value) in pairs {
            self.push(key);
            self.push(value);
        }
    }

    fn push_plan(&mut self, plan: &ProjectPlan) {
        self.push(&plan.name);
        self.push(&plan.description);
        self.push_sorted(&plan.fields);
    }

    fn fingerprint(&self) -> String {
        format!("{:016x}", nexus_pipeline::ids::fnv1a(&self.0))
    }
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
            ..Default::default()
        }
    }

    #[test]
    fn empty_description_is_invalid() {
        assert!(matches!(
            validate_start(
                &request("  "),
                100,
                &crate::catalog::tests::catalog(),
                CostCaps::default()
            ),
            Err(ApiError::InvalidArgument(_))
        ));
    }

    #[test]
    fn oversized_plan_names_its_size_and_the_limit() {
        let Err(ApiError::TooLarge(message)) = validate_start(
            &request(&"x".repeat(101)),
            100,
            &crate::catalog::tests::catalog(),
            CostCaps::default(),
        ) else {
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
    fn cost_caps_default_cap_and_refuse() {
        let caps = CostCaps {
            default_usd: 1.0,
            max_usd: 5.0,
        };
        assert_eq!(caps.for_request(0.0).unwrap(), 1.0);
        assert_eq!(caps.for_request(2.5).unwrap(), 2.5);
        assert!(caps.for_request(6.0).is_err());
        assert!(caps.for_request(-1.0).is_err());
        assert_eq!(CostCaps::default().for_request(0.0).unwrap(), 0.0);
        let only_max = CostCaps {
            default_usd: 0.0,
            max_usd: 5.0,
        };
        assert_eq!(only_max.for_request(0.0).unwrap(), 5.0);
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
