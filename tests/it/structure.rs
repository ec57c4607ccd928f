//! The module graph: which top-level modules of `src/` name which others (`crate::X` outside
//! comments). Lower modules must not import higher ones, so the graph has no cycle, and only
//! the command line names the composition root (`app`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::common::repo;

fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_string_lossy().into_owned();
    let name = first.trim_end_matches(".rs").to_owned();
    (name != "main" && name != "lib").then_some(name)
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Module → the modules it names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = repo().join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in all {
        let Some(module) = top_module(&src, &file) else { continue };
        let text = std::fs::read_to_string(&file).expect("readable");
        let edges = graph.entry(module.clone()).or_default();
        for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for (i, _) in line.match_indices("crate::") {
                let name: String = line[i + 7..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
                if !name.is_empty() && name != module {
                    edges.insert(name);
                }
            }
        }
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for edges in graph.values_mut() {
        edges.retain(|m| modules.contains(m));
    }
    graph
}

/// The modules on a cycle with `start`: those it reaches that also reach it.
fn cycle_of(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> BTreeSet<String> {
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_owned()];
        while let Some(m) = todo.pop() {
            for next in graph.get(&m).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let forward = reach(start);
    forward.into_iter().filter(|m| m == start || reach(m).contains(start)).collect()
}

#[test]
fn no_module_imports_one_above_it() {
    let graph = graph();
    for module in graph.keys() {
        let cycle = cycle_of(&graph, module);
        assert!(cycle.is_empty(), "{module} is on an import cycle: {cycle:?}\n{graph:#?}");
    }
}

#[test]
fn only_the_command_line_names_the_composition_root() {
    let graph = graph();
    let naming: Vec<&String> =
        graph.iter().filter(|(m, edges)| edges.contains("app") && m.as_str() != "cli").map(|(m, _)| m).collect();
    assert!(naming.is_empty(), "{naming:?} import `app`, the composition root");
}

#[test]
fn the_request_path_is_layered() {
    // transport → state → mcp → upstream, each naming only what is below it.
    let graph = graph();
    let below = |upper: &str, lower: &str| graph.get(lower).is_none_or(|e| !e.contains(upper));
    for (upper, lower) in [("transport", "state"), ("state", "mcp"), ("mcp", "upstream"), ("transport", "mcp")] {
        assert!(below(upper, lower), "{lower} imports {upper}");
    }
    for lower in ["mcp", "authn", "error", "upstream", "protocol", "state"] {
        assert!(below("transport", lower), "{lower} imports transport");
    }
}
