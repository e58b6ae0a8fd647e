//! `chunkserver profile`: where a write's time goes, from the `/metrics` of a running
//! cluster (see `crate::metrics` for what each stage measures).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use crate::metrics::{parse_stages, Stage};

type StageRow = (f64, f64, f64, u64);

/// Fetches `http://addr/metrics`.
pub fn fetch(addr: &str) -> Result<String, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    stream.read_to_string(&mut text).map_err(|e| format!("{addr}: {e}"))?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("{addr}: not an HTTP answer"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{addr}: {}", head.lines().next().unwrap_or("")));
    }
    Ok(body.to_string())
}

pub fn run(targets: &[String], svg_path: &Path) -> Result<(), String> {
    let mut all: Vec<(String, BTreeMap<String, StageRow>)> = Vec::new();
    for t in targets {
        match fetch(t) {
            Ok(text) => all.push((t.clone(), parse_stages(&text))),
            Err(e) => eprintln!("skipped {e}"),
        }
    }
    if all.is_empty() {
        return Err("no /metrics answered (start `chunkserver local`, or pass --metrics ADDR,...)".into());
    }
    print!("{}", table(&all));
    std::fs::write(svg_path, svg(&all)).map_err(|e| format!("cannot write {}: {e}", svg_path.display()))?;
    println!("picture: {}", svg_path.display());
    Ok(())
}

fn ordered(rows: &BTreeMap<String, StageRow>) -> Vec<(&'static str, StageRow)> {
    Stage::ALL.iter().filter_map(|s| rows.get(s.name()).map(|r| (s.name(), *r))).collect()
}

pub fn table(all: &[(String, BTreeMap<String, StageRow>)]) -> String {
    let mut s = String::new();
    for (addr, rows) in all {
        let _ = writeln!(s, "{addr}");
        let _ = writeln!(s, "  {:<16} {:>10} {:>10} {:>10} {:>10}", "stage", "count", "p50 µs", "p99 µs", "p99.9 µs");
        for (name, (p50, p99, p999, count)) in ordered(rows) {
            let _ = writeln!(s, "  {name:<16} {count:>10} {p50:>10.0} {p99:>10.0} {p999:>10.0}");
        }
    }
    s
}

/// Horizontal bars per endpoint and stage: p50 solid, p99 pale behind it (log scale).
pub fn svg(all: &[(String, BTreeMap<String, StageRow>)]) -> String {
    let rows: usize = all.iter().map(|(_, r)| ordered(r).len() + 1).sum();
    let (w, row_h, left) = (760.0, 20.0, 200.0);
    let h = 50.0 + rows as f64 * row_h;
    let max = all.iter().flat_map(|(_, r)| r.values().map(|v| v.1)).filter(|v| v.is_finite()).fold(10.0f64, f64::max);
    let x = |us: f64| left + (us.max(1.0).log10() / max.log10()) * (w - left - 120.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ =
        writeln!(s, r#"<text x="10" y="22" font-size="15">Stage latency, µs (log scale): p50 solid, p99 pale</text>"#);
    let mut y = 40.0;
    for (addr, rows) in all {
        let _ = writeln!(s, r#"<text x="10" y="{:.0}" font-weight="bold">{addr}</text>"#, y + 14.0);
        y += row_h;
        for (name, (p50, p99, _, _)) in ordered(rows) {
            let _ = writeln!(s, r#"<text x="20" y="{:.0}">{name}</text>"#, y + 14.0);
            if p99.is_finite() {
                let _ = writeln!(
                    s,
                    r##"<rect x="{left}" y="{:.0}" width="{:.1}" height="14" fill="#9ecae1"/>"##,
                    y + 2.0,
                    x(p99) - left
                );
            }
            if p50.is_finite() {
                let _ = writeln!(
                    s,
                    r##"<rect x="{left}" y="{:.0}" width="{:.1}" height="14" fill="#3182bd"/>"##,
                    y + 2.0,
                    x(p50) - left
                );
            }
            let _ =
                writeln!(s, r#"<text x="{:.1}" y="{:.0}">{p50:.0} / {p99:.0}</text>"#, x(p99.max(p50)) + 6.0, y + 14.0);
            y += row_h;
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_picture_list_stages_in_path_order() {
        let mut rows = BTreeMap::new();
        rows.insert("wal_sync".to_string(), (120.0, 400.0, 900.0, 10));
        rows.insert("nbd_write".to_string(), (800.0, 2000.0, 5000.0, 10));
        let all = vec![("127.0.0.1:9180".to_string(), rows)];
        let t = table(&all);
        assert!(t.find("nbd_write").unwrap() < t.find("wal_sync").unwrap(), "{t}");
        let pic = svg(&all);
        assert_eq!(pic.matches("<rect").count(), 1 + 4);
        assert!(pic.contains("800 / 2000"));
    }
}
