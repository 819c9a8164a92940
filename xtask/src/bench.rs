//! `cargo xtask bench`: runs `dp-bench` (per-packet cost, latency and
//! throughput through the VIP), then draws the plots and the summary tables
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
    let y_max = ys.iter().cloned().fold(0.0, f64::max) * 1.15 + 1e-9;
    let mut c = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0.7f64..x_max).log_scale(), 0f64..y_max)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    c.configure_mesh()
        .x_desc("Services")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
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
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
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
    writeln!(md, "Machine: {}. Command: `{}`. {} rounds of {} runs per series; ns per packet, median of rounds [min-max]; wrapper cost subtracted.\n",
        machine_line(&v), v["command"].as_str().unwrap_or("?"), v["rounds"], v["repeat"])?;
    let header: Vec<String> = scales.iter().map(|s| format!("{} Services", s["services"])).collect();
    writeln!(md, "| path | {} | largest / 1 |", header.join(" | "))?;
    writeln!(md, "|---|{}---|", "---|".repeat(header.len()))?;
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
        let first = median(&scales[0]["series"][&r]);
        let last = median(&scales[scales.len() - 1]["series"][&r]);
        let ratio = match (first, last) {
            (Some(a), Some(b)) if a > 0.0 => format!("{:.2}", b / a),
            _ => "-".into(),
        };
        writeln!(md, "| {r} | {} | {ratio} |", cells.join(" | "))?;
    }
    writeln!(md)?;
    Ok(())
}

const CONTENDERS: [&str; 4] = ["dataplane", "iptables", "nftables", "direct"];

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
    writeln!(md, "Machine: {}. Command: `{}`. {} new connections, {} exchanges and one {} s stream per contender per round, contenders interleaved; median (p99), ratio of medians to direct.\n",
        machine_line(&v), v["command"].as_str().unwrap_or("?"), v["conns"], v["rr"], v["stream_s"])?;
    writeln!(md, "| Services | contender | new conn µs | ratio | req/resp µs | ratio | stream Gbit/s | ratio | rules installed in |")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|")?;
    for s in scales {
        for c in CONTENDERS {
            let x = &s["contenders"][c];
            let r = &s["ratio_to_direct"][c];
            let f = |v: &Value| v.as_f64().map(|x| format!("{x:.1}")).unwrap_or("-".into());
            let f2 = |v: &Value| v.as_f64().map(|x| format!("{x:.2}")).unwrap_or("-".into());
            writeln!(
                md,
                "| {} | {c} | {} ({}) | {} | {} ({}) | {} | {} | {} | {} |",
                s["services"],
                f(&x["new_conn_us"]["summary"]["median"]),
                f(&x["new_conn_us"]["summary"]["p99"]),
                f2(&r["new_conn_median"]),
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

/// Draws every plot and writes `summary.md` from the result files in `dir`.
pub fn report(dir: &Path) -> Result<()> {
    let mut md = String::from("<!-- written by `cargo xtask bench` from the JSON files next to it -->\n\n");
    if dir.join("per-packet.json").exists() {
        per_packet(dir, &mut md)?;
    }
    if dir.join("through-vip.json").exists() {
        through_vip(dir, &mut md)?;
    }
    std::fs::write(dir.join("summary.md"), md)?;
    Ok(())
}
