//! `nexus`: a command-line client of the Nexus gRPC API, the way a person
//! starts a workflow and watches it live. Thin: every command is one or two
//! RPCs. Around it:
//!
//! - `render`: workflows and live events as text for a person (a terminal,
//!   or plain lines for pipes and logs);
//! - `markdown`: a workflow as a Markdown document (`run`, `get --format md`);
//! - `json`: a workflow as JSON (`get --format json`);
//! - `plan_file`: a plan written in Markdown with front matter (`run`);
//! - `steer`: approval gates, forks and comparisons;
//! - `operations`: operators' dead letters and queue depth.

mod json;
mod markdown;
mod operations;
mod plan_file;
mod render;
mod steer;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use nexus_proto::v1::workflow_event::Kind;
use nexus_proto::v1::workflow_service_client::WorkflowServiceClient;
use nexus_proto::v1::{
    CancelWorkflowRequest, GetWorkflowRequest, ListPipelinesRequest, ListWorkflowsRequest, ProjectPlan,
    StartWorkflowRequest, WatchWorkflowRequest, WorkflowStatus,
};
use render::{EventPrinter, Style};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

#[derive(Parser)]
#[command(
    name = "nexus",
    version,
    about = "Run Markdown plans; start, watch, inspect, list and cancel Nexus workflows."
)]
struct Cli {
    /// The orchestrator's gRPC endpoint; https:// for one serving TLS.
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
    /// CA certificates (PEM) to trust for an https:// endpoint, instead of
    /// the system's roots: an orchestrator with a certificate from a
    /// private CA.
    #[arg(long, env = "NEXUS_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// Client certificate (PEM) to present to an https:// endpoint that
    /// requires one (mutual TLS), with --client-key.
    #[arg(long, env = "NEXUS_CLIENT_CERT", global = true, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The private key (PEM) of --client-cert.
    #[arg(long, env = "NEXUS_CLIENT_KEY", global = true, requires = "client_cert")]
    client_key: Option<PathBuf>,
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
        description_file: Option<PathBuf>,
        /// A structured field, as key=value; repeatable.
        #[arg(long = "field", value_parser = parse_field)]
        fields: Vec<(String, String)>,
        #[command(flatten)]
        choices: Choices,
        /// Watch the workflow live until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// Run a plan written in Markdown: start it, watch it live, and write
    /// the final plan with its rating as Markdown.
    ///
    /// The file's front matter (`---` lines at the top, `key: value` each)
    /// gives the plan's fields, its first `# ` heading the workflow's name,
    /// and the rest the plan's text. Exits like `watch`: 0 completed, 1
    /// failed, 3 cancelled.
    Run {
        /// The plan, a Markdown file.
        plan: PathBuf,
        /// Where to write the final plan; `-` for stdout (the live progress
        /// then goes to stderr). Default: `<plan>.nexus.md` beside the plan
        /// (overwritten). Written only when the run completes.
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// A field beside the front matter's (overriding one of the same
        /// key), as key=value; repeatable.
        #[arg(long = "field", value_parser = parse_field)]
        fields: Vec<(String, String)>,
        #[command(flatten)]
        choices: Choices,
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
    Get {
        workflow_id: String,
        /// text: for a person; md: Markdown (what `nexus run` writes); json:
        /// the Workflow message in the proto3 JSON mapping, proto field names.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// List workflows, newest first.
    List {
        #[arg(long, default_value_t = 20)]
        page_size: u32,
        #[arg(long, default_value = "")]
        page_token: String,
        /// Only the forks of this workflow.
        #[arg(long, default_value = "")]
        parent: String,
    },
    /// Cancel a running workflow.
    Cancel {
        workflow_id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Let a run waiting at an approval gate go on, optionally with its
    /// phase's output replaced by a file's text.
    Approve {
        workflow_id: String,
        /// The gated phase's index (0-based); default: where it waits.
        #[arg(long)]
        phase: Option<u32>,
        /// A file whose text replaces the phase's output (a human edit).
        #[arg(long)]
        edit: Option<PathBuf>,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Fail a run waiting at an approval gate.
    Reject {
        workflow_id: String,
        #[arg(long)]
        phase: Option<u32>,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Start a new run from an existing one: phases before --from are
    /// copied (no model call, no cost), the rest run with the overrides.
    Fork {
        workflow_id: String,
        /// The first phase the fork runs itself, by name.
        #[arg(long)]
        from: String,
        /// A model for one role, as role=model; repeatable.
        #[arg(long = "model", value_parser = parse_field)]
        models: Vec<(String, String)>,
        /// A phase's new prompt template from a file, as phase=FILE; repeatable.
        #[arg(long = "prompt", value_parser = parse_field)]
        prompts: Vec<(String, String)>,
        /// Extra instructions (default: the parent's).
        #[arg(long, default_value = "")]
        instructions: String,
        #[arg(long, default_value = "")]
        idempotency_key: String,
        #[arg(long)]
        no_cache: bool,
        #[arg(long, default_value_t = 0.0)]
        max_cost_usd: f64,
        /// Watch the fork live until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// Compare runs (a run and its forks) phase by phase.
    Compare {
        #[arg(required = true, num_args = 2..=10)]
        workflow_ids: Vec<String>,
    },
    /// For operators: tasks no worker could finish (dead letters); list
    /// them, or requeue them after a fix. Needs an admin token.
    #[command(subcommand)]
    DeadLetters(operations::DeadLetters),
    /// For operators: per shard, tasks queued, claimed and not yet read,
    /// the oldest claim's idle time, dead letters and runs awaiting
    /// approval. Needs an admin token.
    Queues,
}

/// What a run may choose besides its plan (`start` and `run` alike).
#[derive(clap::Args)]
struct Choices {
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
}

impl Choices {
    fn request(self, plan: ProjectPlan) -> StartWorkflowRequest {
        StartWorkflowRequest {
            plan: Some(plan),
            idempotency_key: self.idempotency_key,
            pipeline: self.pipeline,
            models: self.models.into_iter().collect(),
            instructions: self.instructions,
            no_cache: self.no_cache,
            max_cost_usd: self.max_cost_usd,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Md,
    Json,
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

/// How a watch ended, and so the exit status of `watch`, `start --watch`
/// and `run`.
#[derive(Clone, Copy, PartialEq)]
enum Watched {
    /// The stream ended without a failure: the run completed.
    Ended,
    Failed,
    Cancelled,
    /// Ctrl-C before the run ended; the run goes on.
    Interrupted,
}

impl Watched {
    fn exit_code(self) -> ExitCode {
        match self {
            Watched::Ended => ExitCode::SUCCESS,
            Watched::Failed => ExitCode::from(1),
            Watched::Cancelled => ExitCode::from(3),
            // As for SIGINT.
            Watched::Interrupted => ExitCode::from(130),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let channel = connect(&cli).await?;
    let auth = Auth(cli.token.as_ref().map(|t| format!("Bearer {t}").parse()).transpose()?);
    let mut client = WorkflowServiceClient::with_interceptor(channel.clone(), auth.clone())
        .max_decoding_message_size(64 * 1024 * 1024);
    match cli.command {
        Command::Start {
            name,
            description,
            description_file,
            fields,
            choices,
            watch,
        } => {
            let description = match (description, description_file) {
                (Some(text), _) => text,
                (None, Some(path)) => read(&path)?,
                (None, None) => anyhow::bail!("give the plan's text with --description or --description-file"),
            };
            let plan = ProjectPlan {
                name,
                description,
                fields: fields.into_iter().collect(),
            };
            let mut printer = stdout_printer(false);
            let workflow_id = start(&mut client, choices.request(plan), &mut printer).await?;
            if watch {
                return Ok(watch_to_end(&mut client, &workflow_id, String::new(), &mut printer)
                    .await?
                    .exit_code());
            }
        }
        Command::Run {
            plan,
            out,
            fields,
            choices,
        } => return run(&mut client, &plan, out, fields, choices).await,
        Command::Watch {
            workflow_id,
            after,
            cursors,
        } => {
            let mut printer = stdout_printer(cursors);
            let watched = watch_to_end(&mut client, &workflow_id, after, &mut printer).await?;
            return Ok(watched.exit_code());
        }
        Command::Get { workflow_id, format } => {
            let workflow = client
                .get_workflow(GetWorkflowRequest {
                    workflow_id,
                    ..Default::default()
                })
                .await?
                .into_inner();
            match format {
                Format::Text => render::workflow(&workflow),
                Format::Md => print!("{}", markdown::workflow(&workflow)),
                Format::Json => println!("{:#}", json::workflow(&workflow)),
            }
        }
        Command::List {
            page_size,
            page_token,
            parent,
        } => {
            let page = client
                .list_workflows(ListWorkflowsRequest {
                    page_size,
                    page_token,
                    parent_workflow_id: parent,
                })
                .await?
                .into_inner();
            render::list(&page);
        }
        Command::Pipelines => {
            let pipelines = client.list_pipelines(ListPipelinesRequest {}).await?.into_inner();
            render::pipelines(&pipelines);
        }
        Command::Approve {
            workflow_id,
            phase,
            edit,
            comment,
        } => render::workflow(&steer::approve(&mut client, workflow_id, phase, edit, comment).await?),
        Command::Reject {
            workflow_id,
            phase,
            reason,
        } => render::workflow(&steer::reject(&mut client, workflow_id, phase, reason).await?),
        Command::Fork {
            workflow_id,
            from,
            models,
            prompts,
            instructions,
            idempotency_key,
            no_cache,
            max_cost_usd,
            watch,
        } => {
            let fork = steer::Fork {
                workflow_id,
                from_phase: from,
                models,
                prompts,
                instructions,
                idempotency_key,
                no_cache,
                max_cost_usd,
            };
            let (fork_id, created) = steer::fork(&mut client, fork).await?;
            let mut printer = stdout_printer(false);
            let how = if created { "started" } else { "already existed" };
            printer.note(&format!("workflow {fork_id} {how}"));
            if watch {
                return Ok(watch_to_end(&mut client, &fork_id, String::new(), &mut printer)
                    .await?
                    .exit_code());
            }
        }
        Command::Compare { workflow_ids } => steer::compare(&mut client, workflow_ids).await?,
        Command::DeadLetters(command) => {
            return operations::dead_letters(&mut operations::client(channel, auth), command).await;
        }
        Command::Queues => operations::queues(&mut operations::client(channel, auth)).await?,
        Command::Cancel { workflow_id, reason } => {
            let workflow = client
                .cancel_workflow(CancelWorkflowRequest { workflow_id, reason })
                .await?
                .into_inner();
            render::workflow(&workflow);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn stdout_printer(cursors: bool) -> EventPrinter<std::io::Stdout> {
    let stdout = std::io::stdout();
    let style = Style::of(&stdout);
    EventPrinter::new(stdout, style, cursors)
}

/// The channel to the orchestrator; over TLS for an https:// endpoint, with
/// the CA and client certificate given (the TLS options are not used for
/// http://).
async fn connect(cli: &Cli) -> anyhow::Result<Channel> {
    let mut endpoint = Channel::from_shared(cli.endpoint.clone())?;
    if cli.endpoint.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        tls = match &cli.ca_file {
            Some(file) => tls.ca_certificate(Certificate::from_pem(read(file)?)),
            None => tls.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&cli.client_cert, &cli.client_key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint.tls_config(tls).context("setting up TLS")?;
    }
    endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {}", cli.endpoint))
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Starts a run and says so; returns its id.
async fn start(
    client: &mut Client,
    request: StartWorkflowRequest,
    printer: &mut EventPrinter<impl Write>,
) -> anyhow::Result<String> {
    let started = client.start_workflow(request).await?.into_inner();
    let how = if started.created { "started" } else { "already existed" };
    printer.note(&format!("workflow {} {how}", started.workflow_id));
    Ok(started.workflow_id)
}

/// `nexus run`: the plan file's run, watched live like `start --watch`;
/// once it completed, its Markdown (the same as `get --format md`) is
/// written where `out` says.
async fn run(
    client: &mut Client,
    plan_path: &Path,
    out: Option<PathBuf>,
    fields: Vec<(String, String)>,
    choices: Choices,
) -> anyhow::Result<ExitCode> {
    let mut plan = plan_file::parse(&read(plan_path)?).with_context(|| format!("reading {}", plan_path.display()))?;
    plan.fields.extend(fields);
    let out = Destination::new(out, plan_path)?;
    let (workflow_id, watched) = match &out {
        // The Markdown takes stdout, so the progress goes to stderr.
        Destination::Stdout => {
            let stderr = std::io::stderr();
            let style = Style::of(&stderr);
            watch_run(
                client,
                choices.request(plan),
                &mut EventPrinter::new(stderr, style, false),
            )
            .await?
        }
        Destination::File(_) => watch_run(client, choices.request(plan), &mut stdout_printer(false)).await?,
    };
    if watched == Watched::Interrupted {
        let redirect = match &out {
            Destination::Stdout => String::new(),
            Destination::File(path) => format!(" > {}", path.display()),
        };
        eprintln!("and once it has ended, write its plan with:\n  nexus get {workflow_id} --format md{redirect}");
        return Ok(watched.exit_code());
    }
    let workflow = client
        .get_workflow(GetWorkflowRequest {
            workflow_id: workflow_id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    if workflow.status() != WorkflowStatus::Completed {
        eprintln!(
            "no final plan: the run is {}; nothing written to {}",
            markdown::short_name(workflow.status().as_str_name()),
            out.shown()
        );
        return Ok(watched.exit_code());
    }
    let document = markdown::workflow(&workflow);
    match &out {
        Destination::Stdout => print!("{document}"),
        Destination::File(path) => {
            std::fs::write(path, document).with_context(|| format!("writing {}", path.display()))?;
            println!("final plan and rating written to {}", path.display());
        }
    }
    Ok(watched.exit_code())
}

async fn watch_run(
    client: &mut Client,
    request: StartWorkflowRequest,
    printer: &mut EventPrinter<impl Write>,
) -> anyhow::Result<(String, Watched)> {
    let workflow_id = start(client, request, printer).await?;
    let watched = watch_to_end(client, &workflow_id, String::new(), printer).await?;
    Ok((workflow_id, watched))
}

/// Where `nexus run` writes the final plan.
enum Destination {
    Stdout,
    File(PathBuf),
}

impl Destination {
    /// `-` is stdout; no `--out` is `<stem>.nexus.md` beside the plan. A
    /// file whose folder does not exist is refused before the run starts,
    /// not after it was paid for.
    fn new(out: Option<PathBuf>, plan: &Path) -> anyhow::Result<Self> {
        let path = match out {
            Some(path) if path.as_os_str() == "-" => return Ok(Destination::Stdout),
            Some(path) => path,
            None => {
                let stem = plan.file_stem().unwrap_or_default().to_string_lossy();
                plan.with_file_name(format!("{stem}.nexus.md"))
            }
        };
        anyhow::ensure!(path != plan, "--out {} would overwrite the plan", path.display());
        let folder = path.parent().filter(|folder| !folder.as_os_str().is_empty());
        if let Some(folder) = folder {
            anyhow::ensure!(
                folder.is_dir(),
                "--out {}: no folder {}",
                path.display(),
                folder.display()
            );
        }
        Ok(Destination::File(path))
    }

    fn shown(&self) -> String {
        match self {
            Destination::Stdout => "stdout".into(),
            Destination::File(path) => path.display().to_string(),
        }
    }
}

async fn watch_to_end(
    client: &mut Client,
    workflow_id: &str,
    after_cursor: String,
    printer: &mut EventPrinter<impl Write>,
) -> anyhow::Result<Watched> {
    let request = WatchWorkflowRequest {
        workflow_id: workflow_id.to_string(),
        after_cursor,
        ..Default::default()
    };
    let mut events = client.watch_workflow(request).await?.into_inner();
    let mut watched = Watched::Ended;
    let mut last_cursor = String::new();
    // One listener for the whole watch, not one per event: each `ctrl_c()`
    // hears only the signals after it was first polled, so a Ctrl-C that
    // came while an event was being printed was lost, and the watch went on
    // to the end of the run.
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let event = tokio::select! {
            event = events.message() => event,
            _ = &mut interrupted => {
                printer.finish();
                detached(workflow_id, &last_cursor);
                return Ok(Watched::Interrupted);
            }
        };
        let event = match event {
            Ok(Some(event)) => event,
            Ok(None) => break,
            Err(status) => {
                printer.finish();
                return Err(status.into());
            }
        };
        last_cursor = event.cursor.clone();
        printer.print(&event);
        watched = match &event.kind {
            Some(Kind::Failed(_)) => Watched::Failed,
            Some(Kind::Cancelled(_)) => Watched::Cancelled,
            _ => watched,
        };
    }
    printer.finish();
    Ok(watched)
}

/// Ctrl-C on a watch leaves the run going: it says so, and how to pick the
/// stream up again where it was left.
fn detached(workflow_id: &str, last_cursor: &str) {
    let after = if last_cursor.is_empty() {
        String::new()
    } else {
        format!(" --after {last_cursor}")
    };
    eprintln!("\nstopped watching; the workflow keeps running. Re-attach with:\n  nexus watch {workflow_id}{after}");
}

fn parse_field(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .ok_or_else(|| format!("{text:?} is not key=value"))
}
