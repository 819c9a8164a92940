use std::{io::IsTerminal, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use dataplane::{
    agent::{self, RunConfig},
    loader::XdpAttachMode,
};
use tracing_subscriber::EnvFilter;

/// eBPF Service dataplane for Kubernetes: a kube-proxy replacement.
#[derive(Parser)]
#[command(name = "dataplane", version)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "DATAPLANE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Source {
    /// A directory of Service and EndpointSlice manifests (--dir).
    Files,
}

#[derive(Subcommand)]
enum Command {
    /// Load the programs, attach them, and keep the maps in sync with a source.
    Run {
        /// Where Services and EndpointSlices come from.
        #[arg(long, value_enum, default_value_t = Source::Files)]
        source: Source,
        /// Manifest directory (with --source files).
        #[arg(long, required = true)]
        dir: PathBuf,
        /// Attach the TC ingress program to this interface (repeatable).
        #[arg(long = "tc-iface")]
        tc_ifaces: Vec<String>,
        /// Attach the XDP program to this interface (repeatable).
        #[arg(long = "xdp-iface")]
        xdp_ifaces: Vec<String>,
        /// XDP attach mode.
        #[arg(long, value_enum, default_value_t = XdpAttachMode::Auto)]
        xdp_mode: XdpAttachMode,
        /// Load this eBPF object instead of the one built into the binary.
        #[arg(long, env = "DATAPLANE_BPF_OBJECT")]
        bpf_object: Option<PathBuf>,
        /// How often the manifest directory is checked for changes, in ms.
        #[arg(long, default_value_t = 100)]
        poll_interval_ms: u64,
    },
}

fn main() -> anyhow::Result<()> {
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
        Command::Run {
            source: Source::Files,
            dir,
            tc_ifaces,
            xdp_ifaces,
            xdp_mode,
            bpf_object,
            poll_interval_ms,
        } => {
            if tc_ifaces.is_empty() && xdp_ifaces.is_empty() {
                anyhow::bail!("no interface to attach to: pass --tc-iface and/or --xdp-iface");
            }
            let cfg = RunConfig {
                dir,
                tc_ifaces,
                xdp_ifaces,
                xdp_mode,
                bpf_object,
                poll_interval: Duration::from_millis(poll_interval_ms),
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(agent::run(cfg))
        }
    }
}
