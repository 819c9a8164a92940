//! The `dataplane` command: `run` starts the agent, `cleanup` removes
//! what it pinned, the others read the live state back (tables or JSON)
//! or trace a synthetic packet.

pub mod args;
pub mod tables;
pub mod trace;

use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::{agent, agent::SourceConfig, bpf::pin, inspect};
use args::{Cli, Command, LogFormat, Output, Proto};
use tables::{backends_table, conntrack_table, services_table, stats_table};
use trace::TraceRequest;

fn print<T: serde::Serialize>(output: Output, value: &T, table: impl FnOnce(&T) -> String) -> anyhow::Result<()> {
    match output {
        Output::Table => print!("{}", table(value)),
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
    }
    Ok(())
}

fn inspect_command(command: Command) -> anyhow::Result<()> {
    let args = match &command {
        Command::Services(a) | Command::Backends(a) | Command::Conntrack(a) | Command::Stats(a) => a,
        Command::Trace(t) => &t.inspect,
        _ => unreachable!("not an inspection command"),
    };
    let maps = inspect::open_pinned(&args.bpffs_root)?;
    match &command {
        Command::Services(a) => print(a.output, &inspect::service_rows(&maps)?, |r| services_table(r)),
        Command::Backends(a) => print(a.output, &inspect::backend_rows(&maps)?, |r| backends_table(r)),
        Command::Conntrack(a) => print(a.output, &inspect::conntrack_rows(&maps)?, |r| conntrack_table(r)),
        Command::Stats(a) => print(a.output, &inspect::stats(&maps)?, stats_table),
        Command::Trace(t) => {
            let req = TraceRequest {
                src: t.src,
                dst: t.dst,
                proto: match t.proto {
                    Proto::Tcp => dataplane_common::IPPROTO_TCP,
                    Proto::Udp => dataplane_common::IPPROTO_UDP,
                },
                tcp_flags: trace::parse_tcp_flags(&t.flags).map_err(|e| anyhow::anyhow!("--flags: {e}"))?,
                program: t.program,
            };
            let report = trace::trace(&maps, t.bpf_object.as_deref(), &req)?;
            print(t.inspect.output, &report, trace::trace_table)
        }
        _ => unreachable!("not an inspection command"),
    }
}
/// Parses the command line and runs the command.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_env("DATAPLANE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    match cli.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
    }
    match cli.command {
        Command::Run(args) => {
            let cfg = args.into_config()?;
            if matches!(cfg.source, SourceConfig::Kubernetes) && cfg.node_name.is_none() {
                anyhow::bail!("--source kubernetes needs the node name: --node-name or NODE_NAME");
            }
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(agent::run(cfg))
        }
        Command::Cleanup { bpffs_root } => {
            let removed = pin::PinRoot::new(&bpffs_root).cleanup()?;
            if removed.is_empty() {
                println!("nothing pinned under {}", bpffs_root.display());
            }
            for r in removed {
                println!("removed {r}");
            }
            Ok(())
        }
        Command::Version { output } => {
            let v = serde_json::json!({
                "version": crate::version::VERSION,
                "commit": crate::version::COMMIT,
                "abi": crate::version::ABI,
            });
            print(output, &v, |_| format!("{}\n", crate::version::describe()))
        }
        command => inspect_command(command),
    }
}
