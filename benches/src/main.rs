//! `fsbench`: workloads the peer benchmarks run through every system's mount.
//!
//! mdtest and IOR are not available here, so this tool provides their kind
//! of workloads, plus the two patterns of AI training that matter for flyfs:
//!
//! - `md`: metadata operations in the style of mdtest (easy and hard);
//! - `loader prepare` / `loader run`: a training job's data loader reading
//!   many small files whole, in random order;
//! - `checkpoint`: ranks writing a checkpoint at once, one large file each.
//!
//! The work is done by worker processes (see [`worker`]). Each subcommand
//! prints exactly one JSON object on stdout at the end; progress goes to
//! stderr. Every failed operation, short read or wrong byte is an error: the
//! tool then exits non-zero with a message saying what went wrong where.

#![deny(unsafe_code)]

mod checkpoint;
mod files;
mod loader;
mod md;
mod worker;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};

/// Workloads for comparing file systems through their mounts.
#[derive(Debug, Parser)]
#[command(name = "fsbench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, stat, read, list and remove small files, in the style of
    /// mdtest.
    Md(md::Args),
    /// The data loader of a training job: prepare a data set, then read it.
    #[command(subcommand)]
    Loader(loader::Command),
    /// Processes writing a checkpoint at once, one large file each.
    Checkpoint(checkpoint::Args),
    /// Runs one worker process (started by the other subcommands).
    #[command(name = worker::SUBCOMMAND, hide = true)]
    Worker {
        /// The worker's task, as JSON.
        #[arg(long)]
        task: String,
    },
}

/// A worker's task, passed from the parent as JSON.
#[derive(Debug, Serialize, Deserialize)]
enum Task {
    /// A process of `md`.
    Md(md::Task),
    /// A writer of `loader prepare`.
    LoaderWrite(loader::WriteTask),
    /// A reader of `loader run`.
    LoaderRead(loader::ReadTask),
    /// A writer of `checkpoint`.
    Checkpoint(checkpoint::Task),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let worker = matches!(cli.command, Command::Worker { .. });
    match run(cli.command) {
        Ok(Some(json)) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let who = if worker { "fsbench worker" } else { "fsbench" };
            eprintln!("{who}: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a subcommand; returns the JSON to print (none for a worker, whose
/// stdout belongs to the barrier).
fn run(command: Command) -> Result<Option<String>> {
    let json = match command {
        Command::Md(args) => serde_json::to_string(&md::run(&args)?),
        Command::Loader(loader::Command::Prepare(args)) => {
            serde_json::to_string(&loader::prepare(&args)?)
        }
        Command::Loader(loader::Command::Run(args)) => serde_json::to_string(&loader::run(&args)?),
        Command::Checkpoint(args) => serde_json::to_string(&checkpoint::run(&args)?),
        Command::Worker { task } => {
            work(&task)?;
            return Ok(None);
        }
    };
    json.context("encoding the result as JSON").map(Some)
}

/// The body of a worker process.
fn work(task: &str) -> Result<()> {
    let task: Task = serde_json::from_str(task).context("decoding the worker's task")?;
    let mut barrier = worker::Barrier::new();
    match &task {
        Task::Md(task) => md::work(task, &mut barrier)?,
        Task::LoaderWrite(task) => loader::write(task, &mut barrier)?,
        Task::LoaderRead(task) => loader::read(task, &mut barrier)?,
        Task::Checkpoint(task) => checkpoint::work(task, &mut barrier)?,
    }
    barrier.finish()
}
