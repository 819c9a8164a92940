//! `cargo xtask bench`: runs `dp-bench` (per-packet cost, latency and
//! throughput through the VIP, control plane, NodePort packets per second), then draws the plots and the summary tables
//! from the JSON it wrote. Nothing here edits numbers: plots and tables are
//! derived from the result files only.

use std::{fmt::Write, path::Path};

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde_json::Value;

fn load(path: &Path) -> Result<Value> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&s).with_context(|| format!("parsing {}", path.display()))
}

fn median(v: &Value) -> Option<f64> {
    v["summary"]["median"].as_f64()
}

const COLORS: [RGBColor; 9] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(23, 190, 207),
];

type Series = Vec<(String, Vec<(f64, f64)>)>;

/// Draws `series` (lines with their points, a legend at `legend`) on a
/// chart whose axes are already configured.
fn draw_lines<'a, X, Y>(
    c: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    series: &Series,
    legend: SeriesLabelPosition,
) -> Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        c.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(legend)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// A line chart with a log x axis (number of Services).
fn chart(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    series: &Series,
) -> Result<()> {
    let xs: Vec<f64> = series.iter().flat_map(|(_, p)| p.iter().map(|x| x.0)).collect();
    let ys: Vec<f64> = series.iter().flat_map(|(_, p)| p.iter().map(|x| x.1)).collect();
    let x_max = xs.iter().cloned().fold(1.0, f64::max) * 1.5;
    let x_min = xs.iter().cloned().fold(f64::INFINITY, f64::min).min(x_max) / 1.5;
    let y_max = ys.iter().cloned().fold(0.0, f64::max) * 1.15 + 1e-9;
    let mut c = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((x_min..x_max).log_scale(), 0f64..y_max)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    c.configure_mesh()
        .x_desc("Services")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    draw_lines(&mut c, series, SeriesLabelPosition::UpperLeft)
}

/// A point that was not measured because its command was stopped at a
/// time limit: (Services, limit), drawn as a triangle at the limit.
type Stopped = Vec<(String, f64, f64)>;

/// A line chart with log x (Services) and log y axes, for times spanning
/// milliseconds to minutes; `stopped` points are marked, not joined.
fn chart_log(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    series: &Series,
    stopped: &Stopped,
) -> Result<()> {
    let xs: Vec<f64> = series.iter().flat_map(|(_, p)| p.iter().map(|x| x.0)).collect();
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .chain(stopped.iter().map(|s| s.2))
        .filter(|y| *y > 0.0)
        .collect();
    let x_max = xs.iter().cloned().fold(1.0, f64::max) * 1.5;
    let x_min = xs.iter().cloned().fold(f64::INFINITY, f64::min).min(x_max) / 1.5;
    let y_max = ys.iter().cloned().fold(1e-3, f64::max) * 6.0;
    let y_min = ys.iter().cloned().fold(f64::INFINITY, f64::min).min(y_max) / 3.0;
    let mut c = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((x_min..x_max).log_scale(), (y_min..y_max).log_scale())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    c.configure_mesh()
        .x_desc("Services")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y}"))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        c.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for (k, (who, x, limit)) in stopped.iter().enumerate().filter(|(_, s)| &s.0 == name) {
            // Several stopped commands at one scale: markers side by side,
            // labels stacked, to the left of the point.
            let same_x: Vec<usize> = (0..stopped.len()).filter(|&j| stopped[j].1 == *x).collect();
            let rank = same_x.iter().position(|&j| j == k).unwrap_or(0) as i32;
            let at = (*x * 1.08f64.powi(rank), *limit);
            c.draw_series(std::iter::once(TriangleMarker::new(at, 7, color.filled())))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            c.draw_series(std::iter::once(Text::new(
                format!("{who}: > {limit:.0} s, stopped"),
                (*x / 9.0, *limit * 1.5f64.powi(rank + 1)),
                ("sans-serif", 13).into_font().color(&color),
            )))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// When the scales of a result file come from different runs (a part
/// re-run for some scales only), says which came from which.
fn provenance(v: &Value) -> Option<String> {
    let scales = v["scales"].as_array()?;
    let mut runs: Vec<(String, Vec<String>)> = Vec::new();
    for s in scales {
        let r = &s["run"];
        let key = format!(
            "`{}` on {}",
            r["command"].as_str().unwrap_or("?"),
            r["unix_time"].as_i64().map(utc).unwrap_or("?".into())
        );
        let n = s["services"].to_string();
        match runs.iter_mut().find(|(k, _)| *k == key) {
            Some((_, ns)) => ns.push(n),
            None => runs.push((key, vec![n])),
        }
    }
    (runs.len() > 1).then(|| {
        let parts: Vec<String> = runs
            .iter()
            .map(|(k, ns)| format!("{} Services: {k}", ns.join(", ")))
            .collect();
        format!(
            "Scales from different runs (a part re-run for some scales): {}.\n",
            parts.join("; ")
        )
    })
}

/// Unix seconds as `YYYY-MM-DD HH:MM UTC` (civil-from-days, Howard
/// Hinnant's algorithm).
fn utc(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", secs / 3600, secs % 3600 / 60)
}

fn machine_line(v: &Value) -> String {
    let m = &v["machine"];
    format!(
        "{} ({} cores), kernel {}",
        m["cpu_model"].as_str().unwrap_or("?"),
        m["cores"],
        m["kernel"].as_str().unwrap_or("?")
    )
}

/// Per-packet plots (one per program type) and table.
fn per_packet(dir: &Path, md: &mut String) -> Result<()> {
    let v = load(&dir.join("per-packet.json"))?;
    let scales = v["scales"].as_array().context("no scales")?;
    let paths: Vec<String> = v["paths"]
        .as_array()
        .context("no paths")?
        .iter()
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect();
    let point = |series: &str| -> Vec<(f64, f64)> {
        scales
            .iter()
            .filter_map(|s| Some((s["services"].as_f64()?, median(&s["series"][series])?)))
            .collect()
    };
    for prog in ["xdp", "tc"] {
        let mut series: Series = paths
            .iter()
            .map(|p| (p.clone(), point(&format!("{prog}_{p}"))))
            .collect();
        series.push(("baseline: parse + 1 lookup".into(), point("baseline_parse_lookup_net")));
        series.push(("baseline: empty program (loop cost)".into(), point("baseline_empty")));
        let file = dir.join(format!("per-packet-{prog}.svg"));
        let root = SVGBackend::new(&file, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        chart(
            &root,
            &format!(
                "{} program: ns per packet (median of rounds) vs Services",
                prog.to_uppercase()
            ),
            "ns / packet",
            &series,
        )?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    writeln!(md, "### Per-packet cost (BPF_PROG_TEST_RUN)\n")?;
    let pinned = match v["pinned_cpu"].as_u64() {
        Some(cpu) => format!(" The measuring thread pinned to CPU {cpu}."),
        None => String::new(),
    };
    writeln!(md, "Machine: {}. Command: `{}`. {} rounds of {} runs per series; ns per packet, median of rounds [min-max]; wrapper cost subtracted.{pinned}\n",
        machine_line(&v), v["command"].as_str().unwrap_or("?"), v["rounds"], v["repeat"])?;
    if let Some(p) = provenance(&v) {
        writeln!(md, "{p}")?;
    }
    let first = &scales[0];
    let last = &scales[scales.len() - 1];
    let (n_first, n_last) = (&first["services"], &last["services"]);
    // Files written before the scales were interleaved have no
    // `round_orders` and no paired ratios; they are drawn as before.
    if v.get("round_orders").is_some() {
        writeln!(md, "Scales interleaved: in every round each series is measured at every scale in turn, the order of the scales rotating by one from round to round. Paired ratio: per round, a series' value at {n_last} Services over its value at 1 Service in the same round (milliseconds apart, so the machine's drift cancels); median over rounds [p25-p75]. Ratio of medians: the median at {n_last} over the median at {n_first}, over the same rounds.\n")?;
    } else {
        writeln!(md, "Scales measured one after the other (a file from before the interleaved method): the ratio of medians includes the machine's drift between scales; no paired ratios.\n")?;
    }
    let header: Vec<String> = scales.iter().map(|s| format!("{} Services", s["services"])).collect();
    writeln!(
        md,
        "| path | {} | {n_last} / 1, paired (median [p25-p75]) | {n_last} / {n_first}, ratio of medians |",
        header.join(" | ")
    )?;
    writeln!(md, "|---|{}---|---|", "---|".repeat(header.len()))?;
    let mut rows: Vec<String> = Vec::new();
    for prog in ["xdp", "tc"] {
        for p in &paths {
            rows.push(format!("{prog}_{p}"));
        }
    }
    rows.push("baseline_parse_lookup_net".into());
    rows.push("baseline_parse_lookup".into());
    rows.push("baseline_empty".into());
    for r in rows {
        let mut cells = Vec::new();
        for s in scales {
            let x = &s["series"][&r]["summary"];
            cells.push(format!(
                "{:.0} [{:.0}-{:.0}]",
                x["median"].as_f64().unwrap_or(f64::NAN),
                x["min"].as_f64().unwrap_or(f64::NAN),
                x["max"].as_f64().unwrap_or(f64::NAN)
            ));
        }
        let ratio = match (median(&first["series"][&r]), median(&last["series"][&r])) {
            (Some(a), Some(b)) if a > 0.0 => format!("{:.2}", b / a),
            _ => "-".into(),
        };
        let p = &last["paired_ratio_to_1"][&r]["summary"];
        let paired = match (p["median"].as_f64(), p["p25"].as_f64(), p["p75"].as_f64()) {
            (Some(m), Some(lo), Some(hi)) => format!("{m:.2} [{lo:.2}-{hi:.2}]"),
            _ => "-".into(),
        };
        writeln!(md, "| {r} | {} | {paired} | {ratio} |", cells.join(" | "))?;
    }
    writeln!(md)?;
    Ok(())
}

/// In table order; investigations (`dp-bench --contenders`) may measure
/// only some of them, or the XDP and alternative-object variants.
const CONTENDERS: [&str; 10] = [
    "dataplane-socket",
    "dataplane-socket-stack",
    "dataplane",
    "dataplane-xdp",
    "dataplane-alt",
    "direct-tc",
    "iptables",
    "nftables",
    "direct",
    "direct-both",
];

fn through_vip(dir: &Path, md: &mut String) -> Result<()> {
    let v = load(&dir.join("through-vip.json"))?;
    let scales = v["scales"].as_array().context("no scales")?;
    let series = |metric: &str, stat: &str| -> Series {
        CONTENDERS
            .iter()
            .map(|c| {
                let pts = scales
                    .iter()
                    .filter_map(|s| {
                        Some((
                            s["services"].as_f64()?,
                            s["contenders"][*c][metric]["summary"][stat].as_f64()?,
                        ))
                    })
                    .collect();
                (c.to_string(), pts)
            })
            .filter(|(_, pts): &(String, Vec<(f64, f64)>)| !pts.is_empty())
            .collect()
    };
    let file = dir.join("through-vip.svg");
    let root = SVGBackend::new(&file, (1400, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let areas = root.split_evenly((2, 2));
    chart(
        &areas[0],
        "new connection (connect, request, close): median",
        "µs",
        &series("new_conn_us", "median"),
    )?;
    chart(&areas[1], "new connection: p99", "µs", &series("new_conn_us", "p99"))?;
    chart(
        &areas[2],
        "request/response on an open connection: median",
        "µs",
        &series("rr_us", "median"),
    )?;
    chart(
        &areas[3],
        "single-stream throughput: median",
        "Gbit/s",
        &series("stream_gbps", "median"),
    )?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;

    writeln!(md, "### Through the VIP in network namespaces\n")?;
    writeln!(md, "Machine: {}. Command: `{}`. {} new connections, {} exchanges and one {} s stream per contender per round, contenders interleaved; median (p99), ratio of medians to direct (and, for new connections, to direct-both: the same two backends in turn).\n",
        machine_line(&v), v["command"].as_str().unwrap_or("?"), v["conns"], v["rr"], v["stream_s"])?;
    if let Some(p) = provenance(&v) {
        writeln!(md, "{p}")?;
    }
    writeln!(md, "| Services | contender | new conn µs | ratio | vs direct-both | req/resp µs | ratio | stream Gbit/s | ratio | rules installed in |")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|")?;
    for s in scales {
        for c in CONTENDERS {
            let x = &s["contenders"][c];
            if x.is_null() {
                continue;
            }
            let r = &s["ratio_to_direct"][c];
            let f = |v: &Value| v.as_f64().map(|x| format!("{x:.1}")).unwrap_or("-".into());
            let f2 = |v: &Value| v.as_f64().map(|x| format!("{x:.2}")).unwrap_or("-".into());
            writeln!(
                md,
                "| {} | {c} | {} ({}) | {} | {} | {} ({}) | {} | {} | {} | {} |",
                s["services"],
                f(&x["new_conn_us"]["summary"]["median"]),
                f(&x["new_conn_us"]["summary"]["p99"]),
                f2(&r["new_conn_median"]),
                f2(&r["new_conn_median_to_direct_both"]),
                f(&x["rr_us"]["summary"]["median"]),
                f(&x["rr_us"]["summary"]["p99"]),
                f2(&r["rr_median"]),
                f2(&x["stream_gbps"]["summary"]["median"]),
                f2(&r["stream_median"]),
                x["install_s"]
                    .as_f64()
                    .map(|t| format!("{t:.2} s"))
                    .unwrap_or("-".into()),
            )?;
        }
    }
    writeln!(md)?;
    Ok(())
}

/// An install time record (`{"status": "done", "seconds": x}` or
/// `{"status": "stopped", "limit_s": l}`) as a table cell.
fn install_cell(v: &Value) -> String {
    match v["status"].as_str() {
        Some("done") => v["seconds"].as_f64().map(|t| format!("{t:.2} s")).unwrap_or("-".into()),
        Some("stopped") => format!("> {:.0} s, stopped", v["limit_s"].as_f64().unwrap_or(f64::NAN)),
        _ => "-".into(),
    }
}

fn control_plane(dir: &Path, md: &mut String) -> Result<()> {
    let v = load(&dir.join("control-plane.json"))?;
    let scales = v["scales"].as_array().context("no scales")?;
    let pts = |f: &dyn Fn(&Value) -> Option<f64>| -> Vec<(f64, f64)> {
        scales
            .iter()
            .filter_map(|s| Some((s["services"].as_f64()?, f(s)?)))
            .collect()
    };
    let agent = |k: &'static str, stat: &'static str, scale: f64| {
        move |s: &Value| s["agent"][k][stat].as_f64().map(|x| x * scale)
    };
    let files = |k: &'static str, stat: &'static str| move |s: &Value| s["agent_files"][k][stat].as_f64();
    let install = |tool: &'static str| move |s: &Value| s[tool]["seconds"].as_f64();
    let mut stopped: Stopped = Vec::new();
    for s in scales {
        for (tool, label) in [("iptables_restore", "iptables-restore"), ("nft", "nft -f")] {
            if s[tool]["status"] == "stopped" {
                stopped.push((
                    label.to_string(),
                    s["services"].as_f64().unwrap_or(0.0),
                    s[tool]["limit_s"].as_f64().unwrap_or(0.0),
                ));
            }
        }
    }
    let file = dir.join("control-plane.svg");
    let root = SVGBackend::new(&file, (1500, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let areas = root.split_evenly((1, 3));
    chart_log(
        &areas[0],
        "programming N Services x 4 endpoints from cold",
        "seconds",
        &vec![
            (
                "agent: start to all programmed".into(),
                pts(&agent("cold_start_to_all_programmed_ms", "median", 1e-3)),
            ),
            (
                "agent: first sync's compute + map writes".into(),
                pts(&agent("cold_sync_compute_and_apply_ms", "median", 1e-3)),
            ),
            ("iptables-restore".into(), pts(&install("iptables_restore"))),
            ("nft -f".into(), pts(&install("nft"))),
        ],
        &stopped,
    )?;
    chart(
        &areas[1],
        "one EndpointSlice change to its map write",
        "ms",
        &vec![
            ("median".into(), pts(&agent("change_to_map_write_ms", "median", 1.0))),
            ("p99".into(), pts(&agent("change_to_map_write_ms", "p99", 1.0))),
            (
                "manifest directory: median".into(),
                pts(&files("change_to_map_write_ms", "median")),
            ),
            (
                "manifest directory: p99".into(),
                pts(&files("change_to_map_write_ms", "p99")),
            ),
            (
                "sync's own compute + map writes (median)".into(),
                pts(&agent("change_sync_compute_and_apply_ms", "median", 1.0)),
            ),
        ],
    )?;
    chart(
        &areas[2],
        "agent peak RSS (VmHWM)",
        "MiB",
        &vec![("peak RSS".into(), pts(&agent("peak_rss_mib", "median", 1.0)))],
    )?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;

    writeln!(md, "### Control plane\n")?;
    writeln!(md, "Machine: {}. Command: `{}`. The release agent against the fake API server, {} agent run(s) per scale with {} EndpointSlice changes each (2 ms debounce included), each agent started once the machine is quiet (at most 10 % CPU over 250 ms, up to 30 s: the kernel frees the previous agent's maps after it exits); `iptables-restore` and `nft -f` install kube-proxy's rules for the same Services and endpoints in a fresh namespace, stopped after {} s. Agent figures: median over runs [min-max]; changes: median (p99) over all changes; maps' kernel memory: the kernel's accounting (`memlock` in fdinfo) of all the agent's maps after the changes.\n",
        machine_line(&v), v["command"].as_str().unwrap_or("?"), v["rounds"], v["changes"], v["install_limit_s"])?;
    if let Some(p) = provenance(&v) {
        writeln!(md, "{p}")?;
    }
    let poll_ms: Vec<String> = scales
        .iter()
        .filter_map(|s| s["agent_files"]["poll_interval_ms"].as_u64())
        .map(|ms| ms.to_string())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if !poll_ms.is_empty() {
        writeln!(md, "\"via manifest directory\": the same Services as one YAML file each in a directory (`--source files --poll-interval-ms {}`; watched by inotify since issue 18, polled before), one file rewritten per change, timed from the write to the map write.\n", poll_ms.join("/"))?;
    }
    writeln!(md, "| Services x 4 endpoints | agent start to all programmed | first sync: compute + map writes | one change to map write | one change via manifest directory | agent peak RSS | maps' kernel memory | iptables-restore | nft -f |")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|")?;
    for s in scales {
        let a = &s["agent"];
        let spread = |k: &str, unit: &str, scale: f64| {
            let x = &a[k];
            match (
                x["median"].as_f64(),
                x["min"].as_f64(),
                x["max"].as_f64(),
                x["n"].as_u64(),
            ) {
                (Some(m), _, _, Some(1)) => format!("{:.0} {unit}", m * scale),
                (Some(m), Some(lo), Some(hi), _) => {
                    format!("{:.0} {unit} [{:.0}-{:.0}]", m * scale, lo * scale, hi * scale)
                }
                _ => "-".into(),
            }
        };
        let change = |ch: &Value| match (ch["median"].as_f64(), ch["p99"].as_f64()) {
            (Some(m), Some(p)) => format!("{m:.1} ms ({p:.1})"),
            _ => "-".into(),
        };
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s["services"],
            spread("cold_start_to_all_programmed_ms", "ms", 1.0),
            spread("cold_sync_compute_and_apply_ms", "ms", 1.0),
            change(&a["change_to_map_write_ms"]),
            change(&s["agent_files"]["change_to_map_write_ms"]),
            spread("peak_rss_mib", "MiB", 1.0),
            spread("maps_kernel_mib", "MiB", 1.0),
            install_cell(&s["iptables_restore"]),
            install_cell(&s["nft"]),
        )?;
    }
    writeln!(md)?;
    control_plane_scrapes(scales, md)
}

/// The cost of a `/metrics` scrape per scale (runs of the control-plane
/// part that measured it).
fn control_plane_scrapes(scales: &[Value], md: &mut String) -> Result<()> {
    if scales.iter().all(|s| s["agent"]["scrape"].is_null()) {
        return Ok(());
    }
    writeln!(md, "`/metrics` scrapes of the same agents (after the changes, nothing attached): wall time of one scrape (median), the agent's syscalls per scrape (`strace -c -f`, all threads) and, since the datapath series are read on a timer, how long that background read of the maps took.\n")?;
    writeln!(
        md,
        "| Services | scrape | syscalls per scrape | of them bpf | background read of the maps |"
    )?;
    writeln!(md, "|---|---|---|---|---|")?;
    for s in scales {
        let sc = &s["agent"]["scrape"];
        let cell = |k: &str, digits: usize, unit: &str| match sc[k]["median"].as_f64() {
            Some(m) => format!("{m:.digits$}{unit}"),
            None => "-".into(),
        };
        writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            s["services"],
            cell("scrape_ms", 2, " ms"),
            cell("syscalls_per_scrape", 0, ""),
            cell("bpf_syscalls_per_scrape", 0, ""),
            cell("background_read_ms", 1, " ms"),
        )?;
    }
    writeln!(md)?;
    Ok(())
}

/// In table order; `dp-bench --nodeport-contenders` may add the XDP
/// generic-mode variant.
const NODEPORT_CONTENDERS: [&str; 5] = ["dataplane", "dataplane-xdp-generic", "iptables", "nftables", "direct"];

/// A line chart over rounds (linear x), for per-round values.
fn chart_rounds(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    series: &Series,
) -> Result<()> {
    let x_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.0))
        .fold(1.0, f64::max)
        + 0.5;
    let y_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(0.0, f64::max)
        * 1.3
        + 1e-9;
    let mut c = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.5f64..x_max, 0f64..y_max)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    c.configure_mesh()
        .x_desc("round")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    draw_lines(&mut c, series, SeriesLabelPosition::UpperRight)
}

/// A ratio record (`{"paired": {"summary": ...}, "of_medians": x}`) as a
/// table cell: paired median [p25-p75] (ratio of medians).
fn ratio_cell(r: &Value) -> String {
    let p = &r["paired"]["summary"];
    match (p["median"].as_f64(), p["p25"].as_f64(), p["p75"].as_f64()) {
        (Some(m), Some(lo), Some(hi)) => format!(
            "{m:.2} [{lo:.2}-{hi:.2}] ({})",
            r["of_medians"].as_f64().map_or("-".into(), |x| format!("{x:.2}"))
        ),
        _ => "-".into(),
    }
}

/// The NodePort table (summary.md) from `nodeport.json` or
/// `nodeport-remote.json`.
fn nodeport_table(v: &Value, md: &mut String) -> Result<()> {
    let scales = v["scales"].as_array().context("no scales")?;
    let remote = v["remote_backends"].as_bool() == Some(true);
    if remote {
        writeln!(
            md,
            "### NodePort from outside (XDP), backends on another node, packets per second\n"
        )?;
    } else {
        writeln!(md, "### NodePort from outside (XDP), packets per second\n")?;
    }
    // Files written before the live-frames generator name none: AF_PACKET.
    let generator = v["generator"].as_str().unwrap_or("AF_PACKET");
    let live = generator.starts_with("live frames");
    let (sender, offered, delivered) = if live {
        (
            "One live-frames generator (XDP_TX, BPF_PROG_TEST_RUN) in the client namespace",
            "sent by the generator's program (frames the node's ring could not take included)",
            if remote {
                "dropped by the XDP sinks on the backends' interfaces (UDP to the backend port)"
            } else {
                "arrived at the backends' interfaces"
            },
        )
    } else {
        (
            "One AF_PACKET sender in the client namespace",
            "accepted by the sender's socket",
            "arrived at the backends' interfaces",
        )
    };
    writeln!(md, "Machine: {}. Command: `{}`. {sender}, {} flows of {}-byte UDP frames (64 on a wire), {} s (at most {} packets) per contender per round, contenders interleaved; thousands of packets per second over the send time, median over rounds [min-max]. Delivered: {delivered}; offered: {offered}; socket: read by the backends' UDP sockets. Ratios of delivered pps, per round (seconds apart): median [p25-p75] (ratio of medians).\n",
        machine_line(v), v["command"].as_str().unwrap_or("?"), v["flows"], v["frame_bytes"], v["send_s"], v["max_packets"])?;
    if let Some(n) = v["node_cpu"].as_str() {
        writeln!(md, "{n}\n")?;
    }
    if live {
        writeln!(md, "Generator: {generator}.\n")?;
    }
    if remote {
        if let Some(p) = v["external_traffic_policy"].as_str() {
            writeln!(md, "{p}.\n")?;
        }
    }
    if let Some(p) = provenance(v) {
        writeln!(md, "{p}")?;
    }
    writeln!(md, "| Services | contender | rounds | delivered kpps | offered kpps | socket kpps | node CPU busy | lost | dataplane / this | this / direct | rules installed in |")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|")?;
    for s in scales {
        for c in NODEPORT_CONTENDERS {
            let x = &s["contenders"][c];
            if x.is_null() {
                continue;
            }
            let k = |m: &str| {
                let y = &x[m]["summary"];
                match (y["median"].as_f64(), y["min"].as_f64(), y["max"].as_f64()) {
                    (Some(m), Some(lo), Some(hi)) => format!("{:.0} [{:.0}-{:.0}]", m / 1e3, lo / 1e3, hi / 1e3),
                    _ => "-".into(),
                }
            };
            let busy = x["node_napi_thread_busy"]["summary"]["median"]
                .as_f64()
                .map_or("-".into(), |b| format!("{:.0} %", b * 100.0));
            let socket = if busy == "-" { k("socket_pps") } else { "-".into() };
            let lost = match (x["lost_packets"].as_u64(), x["sent_packets"].as_u64()) {
                (Some(l), Some(s)) if s > 0 => format!("{l} ({:.2} %)", l as f64 * 100.0 / s as f64),
                _ => "-".into(),
            };
            let ours = if c == "dataplane" {
                "-".to_string()
            } else {
                ratio_cell(&s["ratios"][format!("dataplane/{c}")])
            };
            let to_direct = if c == "direct" {
                "1".to_string()
            } else {
                ratio_cell(&s["ratios"][format!("{c}/direct")])
            };
            writeln!(
                md,
                "| {} | {c} | {} | {} | {} | {socket} | {busy} | {lost} | {ours} | {to_direct} | {} |",
                s["services"],
                s["rounds"],
                k("delivered_pps"),
                k("offered_pps"),
                x["install_s"]
                    .as_f64()
                    .map(|t| format!("{t:.2} s"))
                    .unwrap_or("-".into()),
            )?;
        }
    }
    writeln!(md)?;
    Ok(())
}

/// NodePort (`part`: `nodeport` or `nodeport-remote`): the table and a
/// plot of delivered pps per round.
fn nodeport(dir: &Path, part: &str, md: &mut String) -> Result<()> {
    let v = load(&dir.join(format!("{part}.json")))?;
    let scales = v["scales"].as_array().context("no scales")?;
    let remote = v["remote_backends"].as_bool() == Some(true);
    let file = dir.join(format!("{part}.svg"));
    let root = SVGBackend::new(&file, (800 * scales.len().max(1) as u32, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let areas = root.split_evenly((1, scales.len().max(1)));
    for (s, area) in scales.iter().zip(&areas) {
        let series: Series = NODEPORT_CONTENDERS
            .iter()
            .filter_map(|c| {
                let raw = s["contenders"][*c]["delivered_pps"]["raw"].as_array()?;
                let pts = raw
                    .iter()
                    .enumerate()
                    .filter_map(|(i, y)| Some((i as f64 + 1.0, y.as_f64()? / 1e3)))
                    .collect();
                Some((c.to_string(), pts))
            })
            .collect();
        chart_rounds(
            area,
            &format!(
                "NodePort{}, {} Services: delivered packets per second, by round",
                if remote { ", backends on another node" } else { "" },
                s["services"]
            ),
            "thousand packets / s",
            &series,
        )?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    nodeport_table(&v, md)
}

/// Draws every plot and writes `summary.md` from the result files in `dir`.
pub fn report(dir: &Path) -> Result<()> {
    let mut md = String::from("<!-- written by `cargo xtask bench` from the JSON files next to it -->\n\n");
    if dir.join("per-packet.json").exists() {
        per_packet(dir, &mut md)?;
    }
    if dir.join("through-vip.json").exists() {
        through_vip(dir, &mut md)?;
    }
    // Only the new layout (one entry per scale); the single-size file of
    // the former `bench-sync` is not drawn.
    let cp = dir.join("control-plane.json");
    if cp.exists() && load(&cp)?["part"] == "control_plane" {
        control_plane(dir, &mut md)?;
    }
    for part in ["nodeport", "nodeport-remote"] {
        if dir.join(format!("{part}.json")).exists() {
            nodeport(dir, part, &mut md)?;
        }
    }
    std::fs::write(dir.join("summary.md"), md)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    /// A per-packet file with two scales, `xdp_x` measured in two rounds,
    /// with paired ratios when `paired` (the interleaved method) or as the
    /// sequential method wrote them.
    fn per_packet_file(paired: bool) -> serde_json::Value {
        let series =
            |a: f64, b: f64| json!({ "xdp_x": { "raw_ns": [a, b], "summary": { "median": a, "min": a, "max": b } } });
        let mut v = json!({
            "part": "per_packet", "command": "t", "rounds": 2, "repeat": 10, "machine": {},
            "paths": [{ "name": "x" }],
            "scales": [
                { "services": 1, "series": series(100.0, 200.0) },
                { "services": 1000, "series": series(110.0, 210.0) },
            ],
        });
        if paired {
            v["round_orders"] = json!([[1, 1000], [1000, 1]]);
            v["scales"][1]["paired_ratio_to_1"] =
                json!({ "xdp_x": { "raw": [1.1, 1.05], "summary": { "median": 1.05, "p25": 1.05, "p75": 1.1 } } });
        }
        v
    }

    #[test]
    fn per_packet_table_old_and_new_files() {
        for paired in [false, true] {
            let dir = std::env::temp_dir().join(format!("xtask-pp-{}-{paired}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("per-packet.json"), per_packet_file(paired).to_string()).unwrap();
            let mut md = String::new();
            let r = super::per_packet(&dir, &mut md);
            std::fs::remove_dir_all(&dir).unwrap();
            r.unwrap();
            let row = md.lines().find(|l| l.starts_with("| xdp_x |")).unwrap();
            if paired {
                assert!(md.contains("Scales interleaved"));
                assert!(row.ends_with("| 1.05 [1.05-1.10] | 1.10 |"), "{row}");
            } else {
                assert!(md.contains("one after the other"));
                assert!(row.ends_with("| - | 1.10 |"), "{row}");
            }
        }
    }

    /// Bench results in git stay small: the raw samples go to the
    /// git-ignored `bench-results/raw/` (dp-bench), the committed JSON keeps
    /// the summaries and per-round values the report is drawn from.
    #[test]
    fn committed_bench_results_stay_small() {
        fn size(p: &std::path::Path) -> u64 {
            match std::fs::read_dir(p) {
                Ok(d) => d.flatten().map(|e| size(&e.path())).sum(),
                Err(_) => std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
            }
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench-results");
        let total: u64 = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            // Git-ignored (.gitignore).
            .filter(|e| e.file_name() != "raw" && e.file_name() != "tmp")
            .map(|e| size(&e.path()))
            .sum();
        assert!(
            total < 2 << 20,
            "bench-results/ outside raw/ holds {total} bytes (2 MiB at most): raw samples in a result file? `dp-bench --compact` moves them to raw/"
        );
    }

    #[test]
    fn nodeport_table_rows_and_ratios() {
        let c = |d: f64| {
            json!({ "install_s": 0.5, "sent_packets": 1000, "lost_packets": 10,
                "delivered_pps": { "summary": { "median": d, "min": d - 1000.0, "max": d + 1000.0 } },
                "offered_pps": { "summary": { "median": d, "min": d, "max": d } },
                "socket_pps": { "summary": { "median": d, "min": d, "max": d } } })
        };
        let r = |m: f64| json!({ "paired": { "summary": { "median": m, "p25": m - 0.1, "p75": m + 0.1 } }, "of_medians": m });
        let v = json!({
            "part": "nodeport", "command": "cargo xtask bench --only nodeport", "machine": {},
            "flows": 256, "frame_bytes": 60, "send_s": 4.0, "max_packets": 100,
            "scales": [{ "services": 10000, "rounds": 3,
                "contenders": { "dataplane": c(300_000.0), "iptables": c(100_000.0), "direct": c(400_000.0) },
                "ratios": { "dataplane/iptables": r(3.0), "dataplane/direct": r(0.75), "iptables/direct": r(0.25) } }],
        });
        let mut md = String::new();
        super::nodeport_table(&v, &mut md).unwrap();
        let row = |c: &str| {
            md.lines()
                .find(|l| l.starts_with(&format!("| 10000 | {c} |")))
                .unwrap()
                .to_string()
        };
        assert_eq!(
            row("dataplane"),
            "| 10000 | dataplane | 3 | 300 [299-301] | 300 [300-300] | 300 [300-300] | - | 10 (1.00 %) | - | 0.75 [0.65-0.85] (0.75) | 0.50 s |"
        );
        // With the node's receive on its own CPU: its busy share, no
        // socket rate.
        let mut v2 = v.clone();
        v2["scales"][0]["contenders"]["iptables"]["node_napi_thread_busy"] = json!({ "summary": { "median": 0.962 } });
        let mut md2 = String::new();
        super::nodeport_table(&v2, &mut md2).unwrap();
        assert!(md2.contains("| 10000 | iptables | 3 | 100 [99-101] | 100 [100-100] | - | 96 % | 10 (1.00 %) |"));
        assert!(row("iptables").contains("| 3.00 [2.90-3.10] (3.00) | 0.25 [0.15-0.35] (0.25) |"));
        assert!(row("direct").contains("| 0.75 [0.65-0.85] (0.75) | 1 |"));
        // Contenders not measured have no row.
        assert!(!md.contains("nftables"));
        assert!(md.contains("256 flows of 60-byte UDP frames"));
        assert!(md.contains("One AF_PACKET sender"));
        assert!(!md.contains("another node"));
        // Backends on another node, the live-frames generator: said in
        // the heading and the method, the same rows.
        let mut v3 = v.clone();
        v3["part"] = json!("nodeport-remote");
        v3["remote_backends"] = json!(true);
        v3["generator"] = json!("live frames: BPF_PROG_TEST_RUN ...");
        v3["external_traffic_policy"] = json!("Cluster, endpoints on another node");
        let mut md3 = String::new();
        super::nodeport_table(&v3, &mut md3).unwrap();
        assert!(md3.starts_with("### NodePort from outside (XDP), backends on another node, packets per second"));
        assert!(md3.contains("One live-frames generator"));
        assert!(md3.contains("Delivered: dropped by the XDP sinks on the backends' interfaces"));
        assert!(md3.contains("Generator: live frames: BPF_PROG_TEST_RUN ....\n"));
        assert!(md3.contains("Cluster, endpoints on another node.\n"));
        assert!(md3.contains(&row("dataplane")));
    }

    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00 UTC");
        // 2024-02-29 12:34:56 UTC, a leap day.
        assert_eq!(super::utc(1_709_210_096), "2024-02-29 12:34 UTC");
    }
}
