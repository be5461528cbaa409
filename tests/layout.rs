//! The crate's layout stays layered and acyclic: every module imports only from the layers below
//! it (the order `src/lib.rs` gives), and no module reaches, through `crate::` paths, a module that
//! reaches it back.
//!
//! A module is a top-level file or folder under `src/` (`src/health.rs`, or `src/proxy/` with
//! everything in it). The check reads the source as text: every `crate::<module>` outside
//! comments and `#[cfg(test)]` modules is an edge. It prints the graph, so a failure shows which
//! modules form the cycle, and `cargo test --test layout -- --nocapture` shows the layering.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Every `.rs` file under `dir`, recursively.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its comments and its test module.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The modules each module refers to through `crate::`.
fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    sources(src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let relative = file.strip_prefix(src).expect("under src");
        let first = relative
            .components()
            .next()
            .expect("a path")
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable source");
        let code = code(&text);
        let edges = graph.entry(module.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            for name in first_segments(&code[i + "crate::".len()..]) {
                if name != module {
                    edges.insert(name);
                }
            }
        }
    }
    graph
}

/// For each folder under `src/`, the files each of its files refers to (`crate::<folder>::x` or
/// `super::x`). `mod.rs` is the folder itself, the parent of the others, and is left out: a
/// child naming its parent's items is how Rust modules work, not a cycle.
fn folder_graphs(src: &Path) -> BTreeMap<String, Graph> {
    let mut out = BTreeMap::new();
    let mut folders: Vec<PathBuf> = std::fs::read_dir(src)
        .expect("src")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_dir())
        .collect();
    folders.sort();
    for folder in folders {
        let name = folder
            .file_name()
            .expect("a name")
            .to_string_lossy()
            .into_owned();
        let mut files = Vec::new();
        sources(&folder, &mut files);
        let stem = |f: &PathBuf| {
            f.file_stem()
                .expect("a stem")
                .to_string_lossy()
                .into_owned()
        };
        let siblings: BTreeSet<String> = files.iter().map(stem).filter(|s| s != "mod").collect();
        let mut graph = Graph::new();
        for file in files.iter().filter(|f| stem(f) != "mod") {
            let module = stem(file);
            let code = code(&std::fs::read_to_string(file).expect("readable source"));
            let edges = graph.entry(module.clone()).or_default();
            let prefix = format!("crate::{name}::");
            for pattern in [prefix.as_str(), "super::"] {
                for (i, _) in code.match_indices(pattern) {
                    for used in first_segments(&code[i + pattern.len()..]) {
                        if used != module && siblings.contains(&used) {
                            edges.insert(used);
                        }
                    }
                }
            }
        }
        out.insert(name, graph);
    }
    out
}

/// The modules a path after `crate::` starts with: one for `a::b`, each item's first segment
/// for a group such as `{a, b::c}`.
fn first_segments(rest: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let Some(group) = rest.strip_prefix('{') else {
        return vec![ident(rest)]
            .into_iter()
            .filter(|n| !n.is_empty())
            .collect();
    };
    // Split at the group's own commas, not those of a nested `{...}`.
    let (mut items, mut depth, mut start) = (Vec::new(), 0usize, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&group[start..i]);
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items
        .into_iter()
        .map(ident)
        .filter(|n| !n.is_empty() && n != "self")
        .collect()
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        for w in s.graph.get(v).into_iter().flatten() {
            let Some((w, _)) = s.graph.get_key_value(w.as_str()) else {
                continue;
            };
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.stack.contains(&w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                component.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v.as_str()) {
            visit(&mut state, v.as_str());
        }
    }
    state.out
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let graph = graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    for (module, uses) in &graph {
        let uses: Vec<&str> = uses.iter().map(String::as_str).collect();
        println!("{module} -> {}", uses.join(", "));
    }
    assert!(graph.len() > 10, "read too few modules: {graph:?}");
    assert_eq!(cycles(&graph), Vec::<Vec<String>>::new());
}

/// The layers `src/lib.rs` lists, lowest first: a module may import only from those before it.
const LAYERS: [&str; 12] = [
    "shard", "metrics", "events", "routing", "config", "http", "health", "coord", "proxy", "ops",
    "app", "demo",
];

#[test]
fn every_module_imports_only_from_the_layers_below_it() {
    let graph = graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let layer = |module: &str| LAYERS.iter().position(|l| *l == module);
    let mut upward = Vec::new();
    for (module, uses) in &graph {
        let Some(own) = layer(module) else {
            panic!("{module} is in no layer: add it to LAYERS and to the map in src/lib.rs");
        };
        for used in uses {
            if layer(used).is_none_or(|l| l >= own) {
                upward.push(format!("{module} -> {used}"));
            }
        }
    }
    assert_eq!(
        upward,
        Vec::<String>::new(),
        "imports that do not point down"
    );
}

#[test]
fn no_file_imports_a_sibling_that_imports_it_back() {
    let folders = folder_graphs(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(folders.len() >= 6, "read too few folders: {folders:?}");
    for (folder, graph) in &folders {
        for (file, uses) in graph {
            let uses: Vec<&str> = uses.iter().map(String::as_str).collect();
            println!("{folder}/{file} -> {}", uses.join(", "));
        }
        assert_eq!(cycles(graph), Vec::<Vec<String>>::new(), "in src/{folder}/");
    }
}

#[test]
fn the_check_finds_a_cycle_when_there_is_one() {
    let mut graph = Graph::new();
    let edge = |g: &mut Graph, a: &str, b: &str| {
        g.entry(a.to_owned()).or_default().insert(b.to_owned());
        g.entry(b.to_owned()).or_default();
    };
    edge(&mut graph, "config", "lease");
    edge(&mut graph, "lease", "health");
    edge(&mut graph, "health", "config");
    edge(&mut graph, "shard", "body");
    assert_eq!(
        first_segments("{admin, proxy::listener}"),
        ["admin", "proxy"]
    );
    assert_eq!(first_segments("coord::join as c;"), ["coord"]);
    assert_eq!(
        first_segments("{http::{body, error}, shard::DcId};"),
        ["http", "shard"]
    );
    assert_eq!(
        cycles(&graph),
        vec![vec![
            "config".to_owned(),
            "health".to_owned(),
            "lease".to_owned()
        ]]
    );
}
