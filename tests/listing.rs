//! Listings for people and for scripts: `snapshot list --tree` drawn as
//! `virsh snapshot-list --tree` draws it (sizes, ages, the current
//! position), and `--json` on `ps`, `snapshot list` and `snapshot info`.

mod common;
use common::*;
use serde_json::Value;

fn json(home: &Home, args: &[&str]) -> Value {
    let o = home.run(args);
    assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "{args:?}: one line of JSON: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

fn ok(home: &Home, args: &[&str]) -> String {
    let o = home.run(args);
    assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    stdout(&o)
}

#[test]
fn tree_and_json_listings() {
    if !kvm_available("listings") {
        return;
    }
    let home = Home::new("listing");
    let vm = start_guest(&home, "lj", "60", "", &[]);
    vm.wait_for(0, "tick 2", |l| l == "tick 2 ok");
    // a with two children, b and c; the VM is at c.
    ok(&home, &["snapshot", "create", "a", "--vm", "lj"]);
    ok(&home, &["snapshot", "create", "b", "--vm", "lj"]);
    ok(&home, &["snapshot", "revert", "a", "--vm", "lj"]);
    ok(&home, &["snapshot", "create", "c", "--vm", "lj"]);

    let tree = ok(&home, &["snapshot", "list", "--tree", "--vm", "lj"]);
    let lines: Vec<&str> = tree.lines().collect();
    assert_eq!(lines.len(), 4, "{tree}");
    assert_eq!(lines[0], "VM lj (running)");
    let starts = ["  a ", "  +- b ", "* +- c "];
    for (line, start) in lines[1..].iter().zip(starts) {
        assert!(line.starts_with(start), "{start:?}:\n{tree}");
        assert!(
            line.contains("s ago  memory ") && line.contains(" MiB  disk "),
            "{tree}"
        );
    }
    assert!(lines[3].ends_with("<- current"), "{tree}");

    let list = json(&home, &["snapshot", "list", "--vm", "lj", "--json"]);
    let snaps = list["snapshots"].as_array().unwrap();
    let by_name = |n: &str| snaps.iter().find(|s| s["name"] == n).unwrap().clone();
    assert_eq!(snaps.len(), 3, "{list}");
    for (name, parent, current) in [
        ("a", Value::Null, false),
        ("b", "a".into(), false),
        ("c", "a".into(), true),
    ] {
        let s = by_name(name);
        assert_eq!(s["parent"], parent, "{s}");
        assert_eq!(s["current"], current, "{s}");
        assert_eq!(s["vm"], "lj");
        // Only the full one must hold data: b and c store what changed.
        let bytes = s["memory_bytes"].as_u64().unwrap();
        assert!(bytes > 0 || parent != Value::Null, "{s}");
        assert!(s["created_unix_ms"].as_u64().unwrap() > 0, "{s}");
    }

    let ps = json(&home, &["ps", "--json"]);
    let row = ps
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "lj")
        .unwrap();
    assert_eq!(row["state"], "running");
    assert_eq!(row["pid"], vm.pid());
    assert_eq!(row["snapshots"], 3);

    let info = json(&home, &["snapshot", "info", "b", "--vm", "lj", "--json"]);
    assert_eq!(info["name"], "b");
    assert_eq!(info["parent"], "a");
    let o = home.run(&["snapshot", "info", "b", "--vm", "lj", "--json", "--vcpus"]);
    one_line_error(&o, 2, "--json");

    assert_eq!(vm.stop(), Some(0));
    let ps = json(&home, &["ps", "--json"]);
    assert!(ps.as_array().unwrap().is_empty(), "{ps}");
    let ps = json(&home, &["ps", "--all", "--json"]);
    assert_eq!(ps[0]["state"], "stopped", "{ps}");
    assert_eq!(ps[0]["pid"], Value::Null, "{ps}");
    let list = json(&home, &["snapshot", "list", "--json"]);
    assert!(
        list["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["current"] == false),
        "{list}"
    );
    let tree = ok(&home, &["snapshot", "list", "--tree"]);
    assert!(tree.starts_with("VM lj\n") && !tree.contains('*'), "{tree}");
}
