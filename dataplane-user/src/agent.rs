//! `dataplane run`: load and attach the programs, then keep the maps in sync
//! with a source until SIGTERM/SIGINT.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::{
    desired,
    loader::{Dataplane, XdpAttachMode},
    source::files::FileSource,
    sync::Syncer,
};

/// Everything `run` needs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Directory of Service/EndpointSlice manifests.
    pub dir: PathBuf,
    /// Interfaces that get the TC ingress program (pod/host side).
    pub tc_ifaces: Vec<String>,
    /// Interfaces that get the XDP program (external side).
    pub xdp_ifaces: Vec<String>,
    pub xdp_mode: XdpAttachMode,
    /// Load this object instead of the embedded one.
    pub bpf_object: Option<PathBuf>,
    /// How often the directory is checked for changes.
    pub poll_interval: Duration,
}

pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    let mut dp = Dataplane::load(cfg.bpf_object.as_deref()).context("loading the eBPF programs")?;
    let maps = dp.take_maps()?;
    for iface in &cfg.xdp_ifaces {
        dp.attach_xdp(iface, cfg.xdp_mode)?;
        info!(iface = %iface, mode = ?cfg.xdp_mode, "XDP program attached");
    }
    for iface in &cfg.tc_ifaces {
        let mode = dp.attach_tc(iface)?;
        info!(iface = %iface, %mode, "TC ingress program attached");
    }

    let mut syncer = Syncer::new(maps);
    let mut source = FileSource::new(&cfg.dir);
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut tick = tokio::time::interval(cfg.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut syncs: u64 = 0;
    info!(dir = %cfg.dir.display(), "watching manifests");
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        let (objects, mut problems) = match source.poll() {
            Ok(Some(changed)) => changed,
            Ok(None) => continue,
            Err(e) => {
                warn!("{e}; keeping the programmed state");
                continue;
            }
        };
        let started = std::time::Instant::now();
        let desired = desired::compute(&objects.services, &objects.slices);
        problems.extend(desired.problems.iter().cloned());
        for p in &problems {
            warn!(object = %p.object, "{}", p.reason);
        }
        let report = syncer.apply(&desired);
        for e in &report.errors {
            error!("{e}");
        }
        syncs += 1;
        let backends: usize = syncer.programmed().values().map(|p| p.frontend.backends.len()).sum();
        info!(
            sync = syncs,
            frontends = syncer.programmed().len(),
            backends,
            added = report.added,
            updated = report.updated,
            removed = report.removed,
            unchanged = report.unchanged,
            errors = report.errors.len(),
            skipped = problems.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "sync applied"
        );
    }
    info!("shutting down: detaching programs");
    drop(syncer);
    drop(dp);
    Ok(())
}
