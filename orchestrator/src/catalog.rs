//! The pipelines a run can choose, and what a start request's choices make
//! of them.
//!
//! The catalog holds the built-in pipelines (`enterprise-plan`, the default,
//! and `quick-review`), the file `NEXUS_PIPELINE_FILE` (which becomes the
//! default) and every `*.toml` in `NEXUS_PIPELINES_DIR`; each is validated,
//! and resolved against the configured models, at start-up. A run's choices
//! (pipeline name, model per role, extra instructions) resolve to a snapshot
//! like any other: content-addressed by its fingerprint and stored once per
//! shard, so a run with overrides needs nothing new from the workers.

use crate::config::Config;
use crate::errors::ApiError;
use anyhow::Context;
use nexus_pipeline::definition::{
    BUILT_IN_PIPELINES, MAX_INSTRUCTIONS_CHARS, PipelineDefinition, RunOptions, fingerprint,
};
use nexus_proto::internal::{PipelineSnapshot, RunChoices};
use nexus_proto::v1::{ForkWorkflowRequest, PipelineInfo, StartWorkflowRequest};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Longest model id a run may name.
const MAX_MODEL_ID_CHARS: usize = 200;

/// A resolved pipeline as a run starts with it.
#[derive(Clone)]
pub struct ChosenPipeline {
    pub fingerprint: String,
    pub snapshot: Arc<PipelineSnapshot>,
    /// The models and instructions recorded on the run.
    pub choices: RunChoices,
}

pub struct PipelineCatalog {
    definitions: BTreeMap<String, PipelineDefinition>,
    default_name: String,
    models: BTreeMap<String, String>,
    /// Each pipeline resolved with the configured models and no
    /// instructions: what most runs get, computed once.
    plain: HashMap<String, ChosenPipeline>,
}

impl PipelineCatalog {
    /// Loads and checks every pipeline; a bad file stops the orchestrator
    /// with a message naming it.
    pub fn load(config: &Config) -> anyhow::Result<Self> {
        let (mut definitions, default_name) = built_in();
        let mut default_name = Some(default_name);
        if let Some(dir) = &config.pipelines_dir {
            for definition in read_dir(dir)? {
                definitions.insert(definition.name.clone(), definition);
            }
        }
        if let Some(path) = &config.pipeline_file {
            let definition = read_file(path)?;
            default_name = Some(definition.name.clone());
            definitions.insert(definition.name.clone(), definition);
        }
        let default_name = default_name.expect("there are built-in pipelines");
        Self::new(definitions, default_name, config.models.clone())
    }

    /// Only the built-in pipelines, with these models per role.
    pub fn built_in(models: BTreeMap<String, String>) -> anyhow::Result<Self> {
        let (definitions, default_name) = built_in();
        Self::new(definitions, default_name, models)
    }

    fn new(
        definitions: BTreeMap<String, PipelineDefinition>,
        default_name: String,
        models: BTreeMap<String, String>,
    ) -> anyhow::Result<Self> {
        let mut plain = HashMap::new();
        for (name, definition) in &definitions {
            let snapshot = definition.resolve(&models)?;
            let choices = RunChoices {
                models: role_models(definition, &models),
                ..Default::default()
            };
            plain.insert(name.clone(), chosen(snapshot, choices));
        }
        Ok(Self {
            definitions,
            default_name,
            models,
            plain,
        })
    }

    /// Every pipeline of the catalog with the configured models.
    pub fn plain_pipelines(&self) -> impl Iterator<Item = &ChosenPipeline> {
        self.plain.values()
    }

    /// What the request's choices make of the catalog, or why they cannot
    /// be honoured (`INVALID_ARGUMENT` naming the field).
    pub fn choose(&self, request: &StartWorkflowRequest) -> Result<ChosenPipeline, ApiError> {
        let name = match request.pipeline.trim() {
            "" => self.default_name.as_str(),
            name => name,
        };
        let definition = self.definitions.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.definitions.keys().map(String::as_str).collect();
            ApiError::InvalidArgument(format!(
                "pipeline {name:?} does not exist; choose one of: {}",
                known.join(", ")
            ))
        })?;
        let instructions = validate_instructions(&request.instructions)?;
        if request.models.is_empty() && instructions.is_empty() && !request.no_cache {
            return Ok(self.plain[name].clone());
        }
        let models = with_overrides(definition, self.models.clone(), &request.models)?;
        let options = RunOptions {
            instructions,
            no_cache: request.no_cache,
            prompts: None,
        };
        resolved(definition, &models, options)
    }
}

/// The pipeline resolved with a run's models and options, and the choices
/// the run records.
fn resolved(
    definition: &PipelineDefinition,
    models: &BTreeMap<String, String>,
    options: RunOptions<'_>,
) -> Result<ChosenPipeline, ApiError> {
    let snapshot = definition
        .resolve_with(models, options)
        .map_err(|error| ApiError::InvalidArgument(error.to_string()))?;
    let choices = RunChoices {
        models: role_models(definition, models),
        instructions: options.instructions.to_string(),
        no_cache: options.no_cache,
        max_cost_usd: 0.0,
    };
    Ok(chosen(snapshot, choices))
}

/// `models` with the run's overrides, each checked.
fn with_overrides(
    definition: &PipelineDefinition,
    mut models: BTreeMap<String, String>,
    overrides: &HashMap<String, String>,
) -> Result<BTreeMap<String, String>, ApiError> {
    {
        let roles = definition.roles();
        for (role, model) in overrides {
            if !roles.contains(role.as_str()) {
                let roles: Vec<&str> = roles.iter().copied().collect();
                return Err(ApiError::InvalidArgument(format!(
                    "models: pipeline {:?} has no role {role:?}; its roles are: {}",
                    definition.name,
                    roles.join(", ")
                )));
            }
            for part in model.split('|') {
                validate_model_id(role, part)?;
            }
            models.insert(role.clone(), model.trim().to_string());
        }
    }
    Ok(models)
}

impl PipelineCatalog {
    /// The pipeline a fork of a run of `pipeline` runs with: the parent's
    /// models per role (`parent.models`) under the fork's overrides, its
    /// instructions unless the fork gives new ones, and the fork's prompt
    /// overrides, which may only touch phases from `from_index` on.
    pub fn choose_fork(
        &self,
        pipeline: &str,
        parent: &RunChoices,
        request: &ForkWorkflowRequest,
        from_index: usize,
    ) -> Result<ChosenPipeline, ApiError> {
        let definition = self.definitions.get(pipeline).ok_or_else(|| {
            ApiError::FailedPrecondition(format!(
                "the parent ran pipeline {pipeline:?}, which this server no longer offers"
            ))
        })?;
        for (phase, template) in &request.prompts {
            let index = definition.phases.iter().position(|p| &p.name == phase);
            if index.is_some_and(|index| index < from_index) {
                return Err(ApiError::InvalidArgument(format!(
                    "prompts: phase {phase:?} comes before the fork point and is copied, not run"
                )));
            }
            definition
                .check_prompt_override(phase, template)
                .map_err(|problem| ApiError::InvalidArgument(format!("prompts: {problem}")))?;
        }
        let instructions = match request.instructions.trim() {
            "" => parent.instructions.as_str(),
            given => validate_instructions(given)?,
        };
        let mut base = self.models.clone();
        base.extend(parent.models.iter().map(|(role, model)| (role.clone(), model.clone())));
        let models = with_overrides(definition, base, &request.models)?;
        let prompts: BTreeMap<String, String> = request.prompts.clone().into_iter().collect();
        let options = RunOptions {
            instructions,
            no_cache: request.no_cache || parent.no_cache,
            prompts: Some(&prompts),
        };
        resolved(definition, &models, options)
    }

    /// Every pipeline, for `ListPipelines`.
    pub fn describe(&self) -> Vec<PipelineInfo> {
        self.definitions
            .values()
            .map(|definition| PipelineInfo {
                name: definition.name.clone(),
                is_default: definition.name == self.default_name,
                phases: definition.phases.iter().map(|phase| phase.name.clone()).collect(),
                models: role_models(definition, &self.models),
                final_output: definition.final_output.clone(),
            })
            .collect()
    }
}

/// The built-in pipelines by name, and the default's name (the first).
fn built_in() -> (BTreeMap<String, PipelineDefinition>, String) {
    let definitions: Vec<PipelineDefinition> = BUILT_IN_PIPELINES
        .iter()
        .map(|text| PipelineDefinition::from_toml(text).expect("built-in pipelines are valid"))
        .collect();
    let default_name = definitions[0].name.clone();
    let by_name = definitions.into_iter().map(|d| (d.name.clone(), d)).collect();
    (by_name, default_name)
}

fn chosen(snapshot: PipelineSnapshot, choices: RunChoices) -> ChosenPipeline {
    ChosenPipeline {
        fingerprint: fingerprint(&snapshot),
        snapshot: Arc::new(snapshot),
        choices,
    }
}

/// The model of each role the pipeline uses.
fn role_models(definition: &PipelineDefinition, models: &BTreeMap<String, String>) -> HashMap<String, String> {
    definition
        .roles()
        .into_iter()
        .filter_map(|role| Some((role.to_string(), models.get(role)?.clone())))
        .collect()
}

fn validate_model_id(role: &str, model: &str) -> Result<(), ApiError> {
    let model = model.trim();
    let allowed = |c: char| c.is_ascii_alphanumeric() || "/._:-@".contains(c);
    if model.is_empty() || model.chars().count() > MAX_MODEL_ID_CHARS || !model.chars().all(allowed) {
        return Err(ApiError::InvalidArgument(format!(
            "models[{role:?}] must be a model id of 1 to {MAX_MODEL_ID_CHARS} characters from A-Z a-z 0-9 / . _ : - @ (like \"openai/gpt-5\"), not {model:?}"
        )));
    }
    Ok(())
}

fn validate_instructions(instructions: &str) -> Result<&str, ApiError> {
    let trimmed = instructions.trim();
    let length = trimmed.chars().count();
    if length > MAX_INSTRUCTIONS_CHARS {
        return Err(ApiError::InvalidArgument(format!(
            "instructions are {length} characters; at most {MAX_INSTRUCTIONS_CHARS} are allowed"
        )));
    }
    if trimmed.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(ApiError::InvalidArgument(
            "instructions must not contain control characters other than newlines and tabs".into(),
        ));
    }
    Ok(trimmed)
}

fn read_file(path: &std::path::Path) -> anyhow::Result<PipelineDefinition> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading pipeline file {}", path.display()))?;
    PipelineDefinition::from_toml(&text).with_context(|| format!("pipeline file {}", path.display()))
}

/// Every `*.toml` of a directory, in name order.
fn read_dir(dir: &std::path::Path) -> anyhow::Result<Vec<PipelineDefinition>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading pipelines directory {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    paths.sort();
    paths.iter().map(|path| read_file(path)).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn catalog() -> PipelineCatalog {
        let models = BTreeMap::from([
            ("primary".to_string(), "anthropic/claude-sonnet-4.5".to_string()),
            ("reviewer".to_string(), "google/gemini-3-pro-preview".to_string()),
        ]);
        PipelineCatalog::built_in(models).unwrap()
    }

    fn request(pipeline: &str, models: &[(&str, &str)], instructions: &str) -> StartWorkflowRequest {
        StartWorkflowRequest {
            pipeline: pipeline.into(),
            models: models.iter().map(|(r, m)| (r.to_string(), m.to_string())).collect(),
            instructions: instructions.into(),
            ..Default::default()
        }
    }

    #[test]
    fn no_choice_is_the_default_pipeline_resolved_once() {
        let catalog = catalog();
        let chosen = catalog.choose(&request("", &[], "")).unwrap();
        assert_eq!(chosen.snapshot.name, "enterprise-plan");
        assert_eq!(chosen.fingerprint, catalog.plain["enterprise-plan"].fingerprint);
    }

    #[test]
    fn an_override_changes_that_roles_phases_and_is_recorded() {
        let chosen = catalog()
            .choose(&request("quick-review", &[("reviewer", "openai/gpt-5")], ""))
            .unwrap();
        let models: Vec<_> = chosen.snapshot.phases.iter().map(|p| p.model.as_str()).collect();
        assert_eq!(models, ["openai/gpt-5", "anthropic/claude-sonnet-4.5", "openai/gpt-5"]);
        assert_eq!(chosen.choices.models["reviewer"], "openai/gpt-5");
    }

    #[test]
    fn bad_choices_are_invalid_arguments_naming_what_is_wrong() {
        let catalog = catalog();
        let error = |r| match catalog.choose(&r) {
            Err(ApiError::InvalidArgument(message)) => message,
            _ => panic!("expected INVALID_ARGUMENT"),
        };
        assert!(error(request("nope", &[], "")).contains("quick-review"));
        assert!(error(request("", &[("judge", "x/y")], "")).contains("no role \"judge\""));
        assert!(error(request("", &[("primary", "bad model!")], "")).contains("models[\"primary\"]"));
        assert!(error(request("", &[], &"x".repeat(4001))).contains("4001 characters"));
    }
}
