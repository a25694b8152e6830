//! The snapshot tree as people read it, drawn as `virsh snapshot-list
//! --tree` draws it: children under their parent behind `+-`, one line per
//! snapshot with its age and sizes, `*` in the first column on the snapshot
//! the running VM last matched. The CLI (`snapshot list --tree`) and the
//! console hotkey (`Ctrl-A l`) both draw it from the store's listing
//! (`store::list_json`), whoever produced that listing.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// One snapshot of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: String,
    pub vm: String,
    pub parent: Option<String>,
    pub created_unix_ms: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub path: PathBuf,
}

/// The listing's snapshots, and a line for each entry that could not be
/// read (a broken manifest).
pub fn nodes(listing: &Value) -> (Vec<Node>, Vec<String>) {
    let mut ok = Vec::new();
    let mut broken = Vec::new();
    for s in listing["snapshots"].as_array().into_iter().flatten() {
        let path = PathBuf::from(s["path"].as_str().unwrap_or("?"));
        if let Some(e) = s.get("error") {
            broken.push(format!(
                "{}  BROKEN: {}",
                path.display(),
                e.as_str().unwrap_or("?")
            ));
            continue;
        }
        let num = |k: &str| s[k].as_u64().unwrap_or(0);
        ok.push(Node {
            name: s["name"].as_str().unwrap_or("?").to_string(),
            vm: s["vm"].as_str().unwrap_or("?").to_string(),
            parent: s["parent"].as_str().map(str::to_string),
            created_unix_ms: num("created_unix_ms"),
            memory_bytes: num("memory_bytes"),
            disk_bytes: num("disk_bytes"),
            path,
        });
    }
    (ok, broken)
}

/// `12s`, `5m`, `3h`, `2d`.
pub fn age(created_ms: u64, now_ms: u64) -> String {
    let s = now_ms.saturating_sub(created_ms) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

fn is_current(node: &Node, current: Option<&Path>) -> bool {
    current.is_some_and(|c| c == node.path || crate::fsutil::same_file(c, &node.path))
}

/// The lines of one VM's tree (`snaps` all of that VM, oldest first). A
/// snapshot whose parent is not among them (none, or another VM's: a
/// clone's) is a root.
pub fn render(snaps: &[Node], current: Option<&Path>, now_ms: u64) -> Vec<String> {
    let names: Vec<&str> = snaps.iter().map(|n| n.name.as_str()).collect();
    let children = |parent: Option<&str>| -> Vec<usize> {
        (0..snaps.len())
            .filter(|&i| match (&snaps[i].parent, parent) {
                (Some(p), Some(q)) => p == q,
                (p, None) => p.as_deref().is_none_or(|p| !names.contains(&p)),
                (None, Some(_)) => false,
            })
            .collect()
    };
    // (prefix drawn before the name, node), in drawing order.
    let mut rows: Vec<(String, usize)> = Vec::new();
    fn walk(
        i: usize,
        prefix: String,
        cont: String,
        rows: &mut Vec<(String, usize)>,
        children: &dyn Fn(Option<&str>) -> Vec<usize>,
        snaps: &[Node],
    ) {
        rows.push((prefix, i));
        let kids = children(Some(&snaps[i].name));
        for (k, &c) in kids.iter().enumerate() {
            let last = k + 1 == kids.len();
            let next_cont = format!("{cont}{}", if last { "   " } else { "|  " });
            walk(c, format!("{cont}+- "), next_cont, rows, children, snaps);
        }
    }
    for r in children(None) {
        walk(r, String::new(), String::new(), &mut rows, &children, snaps);
    }
    let width = rows
        .iter()
        .map(|(p, i)| p.len() + snaps[*i].name.len())
        .max()
        .unwrap_or(0);
    rows.iter()
        .map(|(prefix, i)| {
            let n = &snaps[*i];
            let cur = is_current(n, current);
            let from = match &n.parent {
                Some(p) if p.contains('/') => format!("  (from {p})"),
                _ => String::new(),
            };
            let label = format!("{prefix}{} ", n.name);
            format!(
                "{} {:<w$} {:>4} ago  memory {:>7.1} MiB  disk {:>7.1} MiB{from}{}",
                if cur { '*' } else { ' ' },
                label,
                age(n.created_unix_ms, now_ms),
                mib(n.memory_bytes),
                mib(n.disk_bytes),
                if cur { "  <- current" } else { "" },
                w = width + 1,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, parent: Option<&str>, t: u64) -> Node {
        Node {
            name: name.into(),
            vm: "v".into(),
            parent: parent.map(Into::into),
            created_unix_ms: t,
            memory_bytes: 16 << 20,
            disk_bytes: 0,
            path: PathBuf::from(format!("/s/{name}")),
        }
    }

    #[test]
    fn draws_branches_like_virsh() {
        let snaps = vec![
            node("a", None, 0),
            node("b", Some("a"), 1000),
            node("c", Some("a"), 2000),
            node("d", Some("b"), 3000),
            node("e", Some("/other/vm/snap"), 4000),
        ];
        let lines = render(&snaps, Some(Path::new("/s/d")), 130_000);
        let heads: Vec<String> = lines
            .iter()
            .map(|l| l.split(" ago").next().unwrap().trim_end().to_string())
            .collect();
        assert_eq!(
            heads,
            [
                "  a          2m",
                "  +- b       2m",
                "* |  +- d    2m",
                "  +- c       2m",
                "  e          2m",
            ]
            .map(|s| s.to_string())
            .to_vec(),
            "{lines:#?}"
        );
        assert!(lines[2].starts_with("* ") && lines[2].ends_with("<- current"));
        assert!(lines[4].contains("(from /other/vm/snap)"));
        assert!(lines[0].contains("memory    16.0 MiB"));
    }

    #[test]
    fn ages() {
        assert_eq!(age(0, 5_000), "5s");
        assert_eq!(age(0, 600_000), "10m");
        assert_eq!(age(0, 3 * 3_600_000), "3h");
        assert_eq!(age(0, 3 * 86_400_000), "3d");
        assert_eq!(age(10, 0), "0s");
    }
}
