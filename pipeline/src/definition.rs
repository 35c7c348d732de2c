//! Pipelines as data.
//!
//! A pipeline file (TOML, see `pipelines/default.toml`) lists phases in order;
//! each names a model role, the stored outputs it reads and a prompt template
//! that uses them as `{{name}}`. [`PipelineDefinition::resolve`] maps roles to
//! model ids and yields the `PipelineSnapshot` that a workflow keeps for its
//! whole life. Validation happens once, at load, so a bad file stops the
//! orchestrator at start-up instead of failing runs later.

use nexus_proto::internal::{OutputKind, PhaseSpec, PipelineSnapshot};
use prost::Message;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// The seed's six phases, alternating two models.
pub const DEFAULT_PIPELINE_TOML: &str = include_str!("../pipelines/default.toml");

/// Three phases: review, revise, rate.
pub const QUICK_REVIEW_TOML: &str = include_str!("../pipelines/quick-review.toml");

/// The pipelines every orchestrator offers without configuration; the first
/// is the default.
pub const BUILT_IN_PIPELINES: &[&str] = &[DEFAULT_PIPELINE_TOML, QUICK_REVIEW_TOML];

/// Most characters of a run's extra instructions.
pub const MAX_INSTRUCTIONS_CHARS: usize = 4000;

/// The name under which the user's plan is available to prompts.
pub const PLAN_INPUT: &str = "plan";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineDefinition {
    pub name: String,
    /// The phase whose output is the final plan.
    pub final_output: String,
    pub phases: Vec<PhaseDefinition>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseDefinition {
    pub name: String,
    pub role: String,
    #[serde(default)]
    pub inputs: Vec<String>,
    #[serde(default)]
    pub system: String,
    pub prompt: String,
    #[serde(default)]
    pub output: OutputFormat,
    pub temperature: Option<f32>,
    #[serde(default)]
    pub max_tokens: u32,
    /// Accept an answer the model cut short (`finish_reason` "length" or
    /// "content_filter"). Off by default: a cut-off plan is not a plan, so
    /// such an answer is a failed try.
    #[serde(default)]
    pub accept_truncated: bool,
    /// Answer from the response cache when an identical request was
    /// answered before (on by default; a run can turn it off).
    #[serde(default = "yes")]
    pub cache: bool,
    /// Ask the model to reason before it answers, with this effort:
    /// "minimal", "low", "medium" or "high" (OpenRouter's `reasoning.effort`).
    #[serde(default)]
    pub reasoning: Option<String>,
    /// Pause the run after this phase until a person approves its output
    /// (ApproveStep, optionally with an edit) or rejects it (RejectStep).
    #[serde(default)]
    pub await_approval: bool,
    /// How long an approval gate waits; a week when unset.
    #[serde(default)]
    pub approval_timeout_secs: Option<u64>,
    /// What a gate's timeout does: "reject" (fail the run; the default) or
    /// "approve" (go on with the output as it is).
    #[serde(default)]
    pub on_approval_timeout: Option<String>,
}

/// How long an approval gate waits when its phase sets no timeout.
pub const DEFAULT_APPROVAL_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// The reasoning efforts a phase may ask for.
pub const REASONING_EFFORTS: &[&str] = &["minimal", "low", "medium", "high"];

fn yes() -> bool {
    true
}

/// What a run adds to its pipeline beyond the models.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions<'a> {
    /// Added to every phase's system prompt.
    pub instructions: &'a str,
    /// No phase is answered from the response cache.
    pub no_cache: bool,
    /// Prompt templates that replace the pipeline's, by phase name (a fork's
    /// overrides); checked by [`PipelineDefinition::check_prompt_override`].
    pub prompts: Option<&'a BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    #[default]
    Text,
    Rating,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("pipeline file is not valid TOML for a pipeline: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("pipeline {pipeline:?}: {problem}")]
    Invalid { pipeline: String, problem: String },
    #[error("no model configured for role {role:?} (phase {phase:?}); set it in NEXUS_MODELS")]
    UnknownRole { role: String, phase: String },
}

impl PipelineDefinition {
    pub fn default_pipeline() -> Self {
        Self::from_toml(DEFAULT_PIPELINE_TOML).expect("the built-in pipeline is valid")
    }

    pub fn from_toml(text: &str) -> Result<Self, PipelineError> {
        let definition: Self = toml::from_str(text)?;
        definition.validate()?;
        Ok(definition)
    }

    fn validate(&self) -> Result<(), PipelineError> {
        let invalid = |problem: String| PipelineError::Invalid {
            pipeline: self.name.clone(),
            problem,
        };
        if self.phases.is_empty() {
            return Err(invalid("it has no phases".into()));
        }
        let mut known: HashSet<&str> = HashSet::from([PLAN_INPUT]);
        for phase in &self.phases {
            validate_phase(phase, &known).map_err(invalid)?;
            if !known.insert(&phase.name) {
                return Err(invalid(format!("phase name {:?} is used twice", phase.name)));
            }
        }
        let ratings = self.phases.iter().filter(|p| p.output == OutputFormat::Rating).count();
        if ratings > 1 {
            return Err(invalid("more than one phase has output = \"rating\"".into()));
        }
        if !self.phases.iter().any(|p| p.name == self.final_output) {
            return Err(invalid(format!("final_output {:?} is not a phase", self.final_output)));
        }
        if self.phases.last().is_some_and(|last| last.await_approval) {
            return Err(invalid(
                "the last phase cannot await approval: there is nothing after it to hold back".into(),
            ));
        }
        Ok(())
    }

    /// Whether `template` may replace phase `phase`'s prompt: the phase
    /// exists and the template uses only placeholders its inputs allow.
    pub fn check_prompt_override(&self, phase: &str, template: &str) -> Result<(), String> {
        let definition = self
            .phases
            .iter()
            .find(|p| p.name == phase)
            .ok_or_else(|| format!("pipeline {:?} has no phase {phase:?}", self.name))?;
        if template.trim().is_empty() {
            return Err(format!("the prompt for phase {phase:?} is empty"));
        }
        match placeholders(template).find(|name| !definition.inputs.iter().any(|input| input == name)) {
            Some(name) => Err(format!(
                "the prompt for phase {phase:?} uses {{{{{name}}}}}, but the phase reads only: {}",
                definition.inputs.join(", ")
            )),
            None => Ok(()),
        }
    }

    /// The roles its phases name, each once.
    pub fn roles(&self) -> BTreeSet<&str> {
        self.phases.iter().map(|phase| phase.role.as_str()).collect()
    }

    /// Maps each phase's role to a model id.
    pub fn resolve(&self, models: &BTreeMap<String, String>) -> Result<PipelineSnapshot, PipelineError> {
        self.resolve_with(models, RunOptions::default())
    }

    /// Maps each phase's role to a model id and applies a run's options:
    /// its extra instructions go into every phase's system prompt.
    pub fn resolve_with(
        &self,
        models: &BTreeMap<String, String>,
        options: RunOptions<'_>,
    ) -> Result<PipelineSnapshot, PipelineError> {
        let phases = self
            .phases
            .iter()
            .map(|phase| phase_spec(phase, models, options))
            .collect::<Result<_, _>>()?;
        Ok(PipelineSnapshot {
            name: self.name.clone(),
            phases,
            final_output_phase: self.final_output.clone(),
        })
    }
}

fn validate_phase(phase: &PhaseDefinition, known: &HashSet<&str>) -> Result<(), String> {
    let name_ok = !phase.name.is_empty()
        && phase
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !name_ok || phase.name == PLAN_INPUT {
        return Err(format!(
            "phase name {:?} must be [A-Za-z0-9_-]+ and not {PLAN_INPUT:?}",
            phase.name
        ));
    }
    if let Some(effort) = phase.reasoning.as_deref().filter(|e| !REASONING_EFFORTS.contains(e)) {
        return Err(format!(
            "phase {:?} asks for reasoning {effort:?}; choose one of {REASONING_EFFORTS:?}",
            phase.name
        ));
    }
    if let Some(action) = phase
        .on_approval_timeout
        .as_deref()
        .filter(|a| !matches!(*a, "approve" | "reject"))
    {
        return Err(format!(
            "phase {:?} has on_approval_timeout {action:?}; choose \"approve\" or \"reject\"",
            phase.name
        ));
    }
    if let Some(input) = phase.inputs.iter().find(|input| !known.contains(input.as_str())) {
        return Err(format!(
            "phase {:?} reads {input:?}, which is neither \"plan\" nor an earlier phase",
            phase.name
        ));
    }
    for placeholder in placeholders(&phase.prompt) {
        if !phase.inputs.iter().any(|input| input == placeholder) {
            return Err(format!(
                "phase {:?} uses {{{{{placeholder}}}}} but does not list it in inputs",
                phase.name
            ));
        }
    }
    Ok(())
}

fn phase_spec(
    phase: &PhaseDefinition,
    models: &BTreeMap<String, String>,
    options: RunOptions<'_>,
) -> Result<PhaseSpec, PipelineError> {
    let chain = models.get(&phase.role).ok_or_else(|| PipelineError::UnknownRole {
        role: phase.role.clone(),
        phase: phase.name.clone(),
    })?;
    let mut chain = model_chain(chain);
    let model = chain.remove(0);
    let output = match phase.output {
        OutputFormat::Text => OutputKind::Text,
        OutputFormat::Rating => OutputKind::Rating,
    };
    Ok(PhaseSpec {
        name: phase.name.clone(),
        model: model.clone(),
        system_prompt: with_instructions(phase.system.trim(), options.instructions.trim()),
        prompt_template: options
            .prompts
            .and_then(|prompts| prompts.get(&phase.name))
            .unwrap_or(&phase.prompt)
            .trim()
            .to_string(),
        inputs: phase.inputs.clone(),
        output: output as i32,
        temperature: phase.temperature,
        max_tokens: phase.max_tokens,
        accept_truncated: phase.accept_truncated,
        no_cache: !phase.cache || options.no_cache,
        reasoning_effort: phase.reasoning.clone().unwrap_or_default(),
        fallback_models: chain,
        role: phase.role.clone(),
        await_approval: phase.await_approval,
        approval_timeout_ms: phase
            .approval_timeout_secs
            .unwrap_or(DEFAULT_APPROVAL_TIMEOUT_SECS)
            .saturating_mul(1000),
        approve_on_timeout: phase.on_approval_timeout.as_deref() == Some("approve"),
    })
}

/// A role's models, first choice first: `a|b|c` is model `a` with
/// fallbacks `b` and `c`. Never empty.
pub fn model_chain(models: &str) -> Vec<String> {
    let chain: Vec<String> = models
        .split('|')
        .map(str::trim)
        .filter(|model| !model.is_empty())
        .map(str::to_string)
        .collect();
    if chain.is_empty() { vec![String::new()] } else { chain }
}

/// A phase's system prompt followed by the run's extra instructions.
fn with_instructions(system: &str, instructions: &str) -> String {
    match (system.is_empty(), instructions.is_empty()) {
        (_, true) => system.to_string(),
        (true, false) => format!("Additional instructions from the user:\n{instructions}"),
        (false, false) => format!("{system}\n\nAdditional instructions from the user:\n{instructions}"),
    }
}

/// A stable fingerprint of a snapshot, naming it in Redis.
pub fn fingerprint(snapshot: &PipelineSnapshot) -> String {
    format!("{:016x}", crate::ids::fnv1a(&snapshot.encode_to_vec()))
}

/// The `{{name}}` placeholders of a template, in order.
fn placeholders(template: &str) -> impl Iterator<Item = &str> {
    template
        .split("{{")
        .skip(1)
        .filter_map(|rest| rest.split_once("}}"))
        .map(|(name, _)| name.trim())
}

/// Fills a template's `{{name}}` placeholders from the given inputs. Missing
/// inputs render empty; validation at load makes that impossible for a
/// template that came through [`PipelineDefinition::from_toml`].
pub fn render_prompt(template: &str, inputs: &HashMap<String, String>) -> String {
    let mut rendered = String::with_capacity(template.len() + inputs.values().map(String::len).sum::<usize>());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let Some(length) = rest[start..].find("}}") else {
            break;
        };
        rendered.push_str(&rest[..start]);
        let name = rest[start + 2..start + length].trim();
        rendered.push_str(inputs.get(name).map(String::as_str).unwrap_or_default());
        rest = &rest[start + length + 2..];
    }
    rendered.push_str(rest);
    rendered
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_models() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("primary".to_string(), "anthropic/claude-sonnet-4.5".to_string()),
            ("reviewer".to_string(), "google/gemini-3-pro-preview".to_string()),
        ])
    }

    #[test]
    fn default_pipeline_is_the_seeds_six_phases_alternating_models() {
        let snapshot = PipelineDefinition::default_pipeline()
            .resolve(&default_models())
            .unwrap();
        let names: Vec<_> = snapshot.phases.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "analyse",
                "feedback",
                "enterprise_plan",
                "quality_review",
                "improve",
                "rate"
            ]
        );
        let models: Vec<_> = snapshot.phases.iter().map(|p| p.model.as_str()).collect();
        assert_eq!(models[0], "anthropic/claude-sonnet-4.5");
        assert_eq!(models[1], "google/gemini-3-pro-preview");
        assert_eq!(snapshot.phases[5].output, OutputKind::Rating as i32);
        assert_eq!(snapshot.final_output_phase, "improve");
    }

    #[test]
    fn a_phase_reading_a_later_phase_is_rejected() {
        let text = r#"
            name = "bad"
            final_output = "a"
            [[phases]]
            name = "a"
            role = "primary"
            inputs = ["b"]
            prompt = "{{b}}"
            [[phases]]
            name = "b"
            role = "primary"
            prompt = "x"
        "#;
        let error = PipelineDefinition::from_toml(text).unwrap_err().to_string();
        assert!(error.contains("neither \"plan\" nor an earlier phase"), "{error}");
    }

    #[test]
    fn a_placeholder_not_listed_in_inputs_is_rejected() {
        let text =
            "name='x'\nfinal_output='a'\n[[phases]]\nname='a'\nrole='r'\ninputs=['plan']\nprompt='{{plan}} {{other}}'";
        let error = PipelineDefinition::from_toml(text).unwrap_err().to_string();
        assert!(error.contains("{{other}}"), "{error}");
    }

    #[test]
    fn unknown_role_names_the_phase() {
        let mut models = default_models();
        models.remove("reviewer");
        let error = PipelineDefinition::default_pipeline()
            .resolve(&models)
            .unwrap_err()
            .to_string();
        assert!(error.contains("reviewer") && error.contains("feedback"), "{error}");
    }

    #[test]
    fn prompt_renders_every_placeholder() {
        let inputs = HashMap::from([
            ("plan".to_string(), "P".to_string()),
            ("a".to_string(), "A".to_string()),
        ]);
        assert_eq!(render_prompt("x {{plan}} y {{ a }} z", &inputs), "x P y A z");
    }

    #[test]
    fn a_role_may_name_fallback_models() {
        let mut models = default_models();
        models.insert("reviewer".into(), "google/gemini-3-pro-preview | openai/gpt-5".into());
        let snapshot = PipelineDefinition::default_pipeline().resolve(&models).unwrap();
        assert_eq!(snapshot.phases[1].model, "google/gemini-3-pro-preview");
        assert_eq!(snapshot.phases[1].fallback_models, ["openai/gpt-5"]);
        assert!(snapshot.phases[0].fallback_models.is_empty());
    }

    #[test]
    fn the_quick_review_is_three_phases_ending_in_a_rating() {
        let snapshot = PipelineDefinition::from_toml(QUICK_REVIEW_TOML)
            .unwrap()
            .resolve(&default_models())
            .unwrap();
        let names: Vec<_> = snapshot.phases.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["review", "revise", "rate"]);
        assert_eq!(snapshot.phases[2].output, OutputKind::Rating as i32);
    }

    #[test]
    fn instructions_go_into_every_system_prompt_and_the_fingerprint() {
        let definition = PipelineDefinition::default_pipeline();
        let plain = definition.resolve(&default_models()).unwrap();
        let options = RunOptions {
            instructions: "Focus on security.",
            ..RunOptions::default()
        };
        let steered = definition.resolve_with(&default_models(), options).unwrap();
        assert!(steered.phases.iter().all(|phase| {
            phase
                .system_prompt
                .ends_with("Additional instructions from the user:\nFocus on security.")
        }));
        assert_ne!(fingerprint(&plain), fingerprint(&steered));
    }

    #[test]
    fn fingerprint_changes_with_the_models() {
        let definition = PipelineDefinition::default_pipeline();
        let one = fingerprint(&definition.resolve(&default_models()).unwrap());
        let mut models = default_models();
        models.insert("reviewer".into(), "openai/gpt-5".into());
        assert_ne!(one, fingerprint(&definition.resolve(&models).unwrap()));
    }
}
