//! The CLI's text tables for the inspection rows.

use crate::inspect::*;

/// An aligned text table: columns padded to their widest cell, numbers
/// right-aligned.
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: Vec<&'static str>) -> Self {
        Table {
            header,
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let n = self.header.len();
        let mut width: Vec<usize> = self.header.iter().map(|h| h.len()).collect();
        let numeric: Vec<bool> = (0..n)
            .map(|c| {
                !self.rows.is_empty()
                    && self
                        .rows
                        .iter()
                        .all(|r| r[c].parse::<f64>().is_ok() && !r[c].contains(':'))
            })
            .collect();
        for r in &self.rows {
            for (c, cell) in r.iter().enumerate() {
                width[c] = width[c].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let line = |cells: Vec<&str>, out: &mut String| {
            let mut l = String::new();
            for (c, cell) in cells.iter().enumerate() {
                if c > 0 {
                    l.push_str("  ");
                }
                let pad = width[c] - cell.chars().count();
                if numeric[c] {
                    l.push_str(&" ".repeat(pad));
                    l.push_str(cell);
                } else {
                    l.push_str(cell);
                    if c + 1 < n {
                        l.push_str(&" ".repeat(pad));
                    }
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        line(self.header.clone(), &mut out);
        for r in &self.rows {
            line(r.iter().map(String::as_str).collect(), &mut out);
        }
        out
    }
}

fn or_dash(s: String) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s
    }
}

pub fn services_table(rows: &[ServiceRow]) -> String {
    let mut t = Table::new(vec![
        "ID",
        "NAME",
        "FRONTEND",
        "BACKENDS",
        "SELECTION",
        "FLAGS",
        "PACKETS",
        "BYTES",
        "NEW_FLOWS",
        "NO_BACKEND",
    ]);
    for r in rows {
        let selection = if r.selection == "maglev" {
            format!("maglev/{}", r.maglev_size)
        } else {
            r.selection.clone()
        };
        let mut flags = r.flags.clone();
        if !r.source_ranges.is_empty() {
            flags.retain(|f| f != "source-ranges");
            flags.push(format!("source-ranges={}", r.source_ranges.join(",")));
        }
        t.row(vec![
            r.id.to_string(),
            or_dash(r.name.clone()),
            r.frontend.clone(),
            r.backends.to_string(),
            selection,
            or_dash(flags.join(" ")),
            r.packets.to_string(),
            r.bytes.to_string(),
            r.new_flows.to_string(),
            r.no_backend.to_string(),
        ]);
    }
    t.render()
}

pub fn backends_table(rows: &[BackendRow]) -> String {
    let mut t = Table::new(vec!["ID", "NAME", "FRONTEND", "GEN", "SLOT", "BACKEND", "REMOTE"]);
    for r in rows {
        t.row(vec![
            r.service_id.to_string(),
            or_dash(r.name.clone()),
            r.frontend.clone(),
            r.generation.to_string(),
            r.slot.to_string(),
            r.backend.clone(),
            if r.remote { "remote" } else { "local" }.into(),
        ]);
    }
    t.render()
}

pub fn conntrack_table(rows: &[ConntrackRow]) -> String {
    let mut t = Table::new(vec![
        "DIR", "PROTO", "SRC", "DST", "NAT", "SNAT", "FLAGS", "SERVICE", "AGE_S", "IDLE_S",
    ]);
    for r in rows {
        t.row(vec![
            r.direction.clone(),
            r.proto.clone(),
            r.src.clone(),
            r.dst.clone(),
            r.nat.clone(),
            r.snat.clone().unwrap_or_else(|| "-".into()),
            or_dash(r.flags.join(",")),
            or_dash(r.service.clone()),
            format!("{:.1}", r.age_s),
            format!("{:.1}", r.idle_s),
        ]);
    }
    t.render()
}

pub fn stats_table(s: &Stats) -> String {
    let mut t = Table::new(vec!["REASON", "DROP", "PACKETS"]);
    for r in &s.reasons {
        t.row(vec![
            r.reason.clone(),
            if r.drop { "drop" } else { "-" }.into(),
            r.packets.to_string(),
        ]);
    }
    let mut out = t.render();
    out.push_str(&format!(
        "\nconntrack: {} of {} entries ({:.2}%), {} created, {} evicted\n\n",
        s.conntrack_entries,
        s.conntrack_max,
        100.0 * s.conntrack_entries as f64 / f64::from(s.conntrack_max.max(1)),
        s.conntrack_created,
        s.conntrack_evicted
    ));
    let mut t = Table::new(vec!["CONNTRACK_EVENT", "COUNT"]);
    for e in &s.conntrack_events {
        t.row(vec![e.event.clone(), e.count.to_string()]);
    }
    out.push_str(&t.render());
    out.push('\n');
    let mut t = Table::new(vec!["HOST_ROUTING", "PACKETS"]);
    for e in &s.host_routing {
        t.row(vec![e.event.clone(), e.count.to_string()]);
    }
    out.push_str(&t.render());
    out.push('\n');
    let mut t = Table::new(vec!["SOCKET_LB_EVENT", "COUNT"]);
    for e in &s.socket_lb {
        t.row(vec![e.event.clone(), e.count.to_string()]);
    }
    out.push_str(&t.render());
    out.push('\n');
    let mut t = Table::new(vec!["MAP", "KIND", "ENTRIES", "MAX_ENTRIES", "USE_%", "KERNEL_KIB"]);
    for m in &s.maps {
        t.row(vec![
            m.map.clone(),
            m.kind.clone(),
            m.entries.to_string(),
            m.max_entries.to_string(),
            format!("{:.2}", 100.0 * m.entries as f64 / f64::from(m.max_entries.max(1))),
            m.memory_bytes.div_ceil(1024).to_string(),
        ]);
    }
    out.push_str(&t.render());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_right_align_numbers() {
        let mut t = Table::new(vec!["NAME", "N"]);
        t.row(vec!["a".into(), "1".into()]);
        t.row(vec!["longer".into(), "100".into()]);
        assert_eq!(t.render(), "NAME      N\na         1\nlonger  100\n");
    }
}
