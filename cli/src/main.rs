//! `nexus`: a command-line client of the Nexus gRPC API, the way a person
//! starts a workflow and watches it live. Thin: every command is one or two
//! RPCs; the printing lives in `render`.

mod render;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nexus_proto::v1::workflow_event::Kind;
use nexus_proto::v1::workflow_service_client::WorkflowServiceClient;
use nexus_proto::v1::{
    CancelWorkflowRequest, GetWorkflowRequest, ListPipelinesRequest, ListWorkflowsRequest, ProjectPlan,
    StartWorkflowRequest, WatchWorkflowRequest,
};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(
    name = "nexus",
    version,
    about = "Start, watch, inspect, list and cancel Nexus workflows."
)]
struct Cli {
    /// The orchestrator's gRPC endpoint.
    #[arg(
        long,
        env = "NEXUS_ENDPOINT",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    endpoint: String,
    /// Bearer token, when the orchestrator requires one (NEXUS_API_TOKEN).
    #[arg(long, env = "NEXUS_API_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a workflow on a project plan.
    Start {
        /// The plan's title.
        #[arg(long)]
        name: String,
        /// The plan's text.
        #[arg(long, conflicts_with = "description_file")]
        description: Option<String>,
        /// Read the plan's text from this file.
        #[arg(long)]
        description_file: Option<std::path::PathBuf>,
        /// A structured field, as key=value; repeatable.
        #[arg(long = "field", value_parser = parse_field)]
        fields: Vec<(String, String)>,
        /// Retrying with the same key returns the same workflow.
        #[arg(long, default_value = "")]
        idempotency_key: String,
        /// The pipeline to run (see `nexus pipelines`); default: the server's.
        #[arg(long, default_value = "")]
        pipeline: String,
        /// A model for one role of this run only, as role=model; repeatable.
        #[arg(long = "model", value_parser = parse_field)]
        models: Vec<(String, String)>,
        /// Extra instructions for every phase of this run.
        #[arg(long, default_value = "")]
        instructions: String,
        /// Call the model for every phase, never the response cache.
        #[arg(long)]
        no_cache: bool,
        /// Stop the run before a model call that would take its cost past
        /// this many USD (default: the server's).
        #[arg(long, default_value_t = 0.0)]
        max_cost_usd: f64,
        /// Watch the workflow live until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// List the pipelines a run can choose, with their phases and models.
    Pipelines,
    /// Stream a workflow's events, live, until it ends.
    Watch {
        workflow_id: String,
        /// Resume after this cursor (printed with --cursors).
        #[arg(long, default_value = "")]
        after: String,
        /// Print each event's cursor.
        #[arg(long)]
        cursors: bool,
    },
    /// Show a workflow: status, phases, usage, final plan and rating.
    Get { workflow_id: String },
    /// List workflows, newest first.
    List {
        #[arg(long, default_value_t = 20)]
        page_size: u32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Cancel a running workflow.
    Cancel {
        workflow_id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

type Client = WorkflowServiceClient<InterceptedService<Channel, Auth>>;

#[derive(Clone)]
struct Auth(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Exit status of `watch` and `start --watch` when the run failed.
const EXIT_FAILED: u8 = 1;
/// ... and when it was cancelled.
const EXIT_CANCELLED: u8 = 3;
/// ... and when the watch was interrupted (Ctrl-C) before the run ended.
const EXIT_INTERRUPTED: u8 = 130;

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    let channel = Channel::from_shared(cli.endpoint.clone())?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", cli.endpoint))?;
    let auth = Auth(cli.token.as_ref().map(|t| format!("Bearer {t}").parse()).transpose()?);
    let mut client = WorkflowServiceClient::with_interceptor(channel, auth).max_decoding_message_size(64 * 1024 * 1024);
    match cli.command {
        Command::Start {
            name,
            description,
            description_file,
            fields,
            idempotency_key,
            pipeline,
            models,
            instructions,
            no_cache,
            max_cost_usd,
            watch,
        } => {
            let description = match (description, description_file) {
                (Some(text), _) => text,
                (None, Some(path)) => {
                    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?
                }
                (None, None) => anyhow::bail!("give the plan's text with --description or --description-file"),
            };
            let plan = ProjectPlan {
                name,
                description,
                fields: fields.into_iter().collect(),
            };
            let started = client
                .start_workflow(StartWorkflowRequest {
                    plan: Some(plan),
                    idempotency_key,
                    pipeline,
                    models: models.into_iter().collect(),
                    instructions,
                    no_cache,
                    max_cost_usd,
                })
                .await?
                .into_inner();
            println!(
                "workflow {} {}",
                started.workflow_id,
                if started.created { "started" } else { "already existed" }
            );
            if watch {
                return watch_to_end(&mut client, &started.workflow_id, String::new(), false).await;
            }
        }
        Command::Watch {
            workflow_id,
            after,
            cursors,
        } => return watch_to_end(&mut client, &workflow_id, after, cursors).await,
        Command::Get { workflow_id } => {
            let workflow = client
                .get_workflow(GetWorkflowRequest { workflow_id })
                .await?
                .into_inner();
            render::workflow(&workflow);
        }
        Command::List { page_size, page_token } => {
            let page = client
                .list_workflows(ListWorkflowsRequest { page_size, page_token })
                .await?
                .into_inner();
            render::list(&page);
        }
        Command::Pipelines => {
            let pipelines = client.list_pipelines(ListPipelinesRequest {}).await?.into_inner();
            render::pipelines(&pipelines);
        }
        Command::Cancel { workflow_id, reason } => {
            let workflow = client
                .cancel_workflow(CancelWorkflowRequest { workflow_id, reason })
                .await?
                .into_inner();
            render::workflow(&workflow);
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

async fn watch_to_end(
    client: &mut Client,
    workflow_id: &str,
    after_cursor: String,
    cursors: bool,
) -> anyhow::Result<std::process::ExitCode> {
    let request = WatchWorkflowRequest {
        workflow_id: workflow_id.to_string(),
        after_cursor,
        ..Default::default()
    };
    let mut events = client.watch_workflow(request).await?.into_inner();
    let mut printer = render::EventPrinter::new(cursors);
    let mut code = std::process::ExitCode::SUCCESS;
    let mut last_cursor = String::new();
    loop {
        let event = tokio::select! {
            event = events.message() => event?,
            _ = tokio::signal::ctrl_c() => return Ok(detached(workflow_id, &last_cursor)),
        };
        let Some(event) = event else { break };
        last_cursor = event.cursor.clone();
        printer.print(&event);
        code = match &event.kind {
            Some(Kind::Failed(_)) => std::process::ExitCode::from(EXIT_FAILED),
            Some(Kind::Cancelled(_)) => std::process::ExitCode::from(EXIT_CANCELLED),
            _ => code,
        };
    }
    Ok(code)
}

/// Ctrl-C on a watch leaves the run going: it says so, and how to pick the
/// stream up again where it was left. Exit status 130, as for SIGINT.
fn detached(workflow_id: &str, last_cursor: &str) -> std::process::ExitCode {
    let after = if last_cursor.is_empty() {
        String::new()
    } else {
        format!(" --after {last_cursor}")
    };
    eprintln!("\nstopped watching; the workflow keeps running. Re-attach with:\n  nexus watch {workflow_id}{after}");
    std::process::ExitCode::from(EXIT_INTERRUPTED)
}

fn parse_field(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .ok_or_else(|| format!("{text:?} is not key=value"))
}
