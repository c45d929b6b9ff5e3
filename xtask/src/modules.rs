//! The module graph of a library crate, read from its sources: which
//! top-level module uses which (`crate::name` paths outside comments and
//! unit tests). Its test, part of the unit tests, keeps the agent's and
//! the collector's graphs free of cycles, so each stage can be read, tested
//! and replaced on its own.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// Top-level module → the top-level modules it uses.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// The graph of the crate whose `lib.rs` is in `src`.
fn graph(src: &Path) -> std::io::Result<Graph> {
    let mut graph = Graph::new();
    for entry in std::fs::read_dir(src)? {
        let path = entry?.path();
        let name = path
            .file_stem()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if name == "lib" || name == "main" {
            continue;
        }
        let mut uses = BTreeSet::new();
        for file in rust_files(&path)? {
            uses.extend(crate_paths(&std::fs::read_to_string(file)?));
        }
        uses.remove(&name);
        graph.entry(name).or_default().extend(uses);
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for uses in graph.values_mut() {
        uses.retain(|m| modules.contains(m));
    }
    Ok(graph)
}

fn rust_files(path: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    if path.is_file() {
        return Ok(if path.extension().is_some_and(|e| e == "rs") {
            vec![path.to_path_buf()]
        } else {
            Vec::new()
        });
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path)? {
        files.extend(rust_files(&entry?.path())?);
    }
    Ok(files)
}

/// The first segment of every `crate::` path in `source`, leaving out
/// comments and the `#[cfg(test)] mod tests` at the end of a file.
fn crate_paths(source: &str) -> BTreeSet<String> {
    let code: String = source
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::{c, d}, e}`: the items at the group's depth.
            let (mut depth, mut item_start) = (0usize, true);
            let mut ident = String::new();
            for c in group.chars() {
                if item_start && (c.is_alphanumeric() || c == '_') {
                    ident.push(c);
                    continue;
                }
                if !ident.is_empty() {
                    out.insert(std::mem::take(&mut ident));
                    item_start = false;
                }
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    _ => {}
                }
            }
            if !ident.is_empty() {
                out.insert(ident);
            }
        } else {
            let ident: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !ident.is_empty() {
                out.insert(ident);
            }
        }
    }
    out
}

/// A cycle of the graph, if it has one: the modules in order, the first
/// repeated at the end.
fn cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        graph: &Graph,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(graph, next, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(graph, node, &mut Vec::new(), &mut done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_read_from_uses_and_expressions_not_comments() {
        let source = "use crate::{a, b::{c, d}, e::F};\n\
                      // crate::commented\n\
                      fn f() { crate::g::h(); }\n\
                      #[cfg(test)]\nmod tests { use crate::t; }\n";
        let found: Vec<String> = crate_paths(source).into_iter().collect();
        assert_eq!(found, ["a", "b", "e", "g"]);
    }

    #[test]
    fn a_cycle_is_found_and_a_tree_has_none() {
        let mut graph = Graph::new();
        graph.entry("a".into()).or_default().insert("b".into());
        graph.entry("b".into()).or_default().insert("c".into());
        graph.entry("c".into()).or_default();
        assert_eq!(cycle(&graph), None);
        graph.get_mut("c").unwrap().insert("a".into());
        assert_eq!(cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
    }

    #[test]
    fn the_agent_and_the_collector_have_no_module_cycle() {
        let root = crate::workspace_root();
        for krate in ["profiler-agent", "profiler-collector"] {
            let graph = graph(&root.join(krate).join("src")).unwrap();
            assert!(graph.len() > 5, "{krate}: {graph:?}");
            assert_eq!(cycle(&graph), None, "{krate}: a module cycle");
        }
    }
}
