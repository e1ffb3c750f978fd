//! No crate of the workspace imports in a cycle between its top-level
//! modules (a module and the files in its folder count as one: `engine`
//! with `engine/apply.rs` and the rest).
//!
//! The check reads each crate's sources: every `crate::name` path (in `use`
//! lines, `use crate::{a, b::c}` groups and inline paths) outside the
//! files' test modules is an edge from the file's top-level module to
//! `name`'s, where a name the crate root re-exports (`pub use m::{Item}`,
//! `pub use m::*`) counts as its module. A cycle fails the test with its
//! members and their edges. Test-only code (`src/tests/`, loom models, a
//! file's `#[cfg(test)]` tail) is left out: tests may use anything.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src").flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The identifiers after each `crate::` in `text`: the first segment of a
/// path, or of each path in a `{...}` group.
fn crate_refs(text: &str) -> Vec<String> {
    let ident = |s: &str| -> String { s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect() };
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            out.extend(group[..end].split(',').map(|p| ident(p.trim())).filter(|s| !s.is_empty()));
        } else {
            let id = ident(rest);
            if !id.is_empty() {
                out.push(id);
            }
        }
    }
    out
}

/// Source without line comments and without the `#[cfg(test)]` tail.
fn code_of(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]") || t.starts_with("#[cfg(all(test") {
            break;
        }
        let code = line.split("//").next().unwrap_or_default();
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// Edges between a crate's top-level modules.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let top_of = |p: &Path| -> Option<String> {
        let rel = p.strip_prefix(src).ok()?;
        let first = rel.components().next()?.as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        let test_only = first == "tests" || rel.to_string_lossy().contains("loom_model");
        (!test_only).then(|| if first == "lib" || first == "main" { "<root>".to_string() } else { first })
    };
    let mut refs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut root_text = String::new();
    for f in &files {
        let Some(top) = top_of(f) else { continue };
        let text = std::fs::read_to_string(f).expect("read");
        if top == "<root>" {
            root_text.push_str(&text);
        }
        refs.entry(top).or_default().extend(crate_refs(&code_of(&text)));
    }
    let tops: BTreeSet<String> = refs.keys().cloned().collect();
    // What the crate root re-exports, by the module it comes from.
    let mut item: HashMap<String, String> = HashMap::new();
    for line in root_text.lines().map(str::trim).filter(|l| l.starts_with("pub use ")) {
        let body = line.trim_start_matches("pub use ").trim_end_matches(';');
        let Some((module, names)) = body.split_once("::") else { continue };
        if names == "*" {
            let f = src.join(format!("{module}.rs"));
            let text = std::fs::read_to_string(f).unwrap_or_default();
            for l in text.lines().map(str::trim) {
                for kind in ["pub struct ", "pub enum ", "pub fn ", "pub const ", "pub type ", "pub trait "] {
                    if let Some(r) = l.strip_prefix(kind) {
                        let id: String = r.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                        item.insert(id, module.to_string());
                    }
                }
            }
        } else {
            for n in names.trim_matches(|c| c == '{' || c == '}').split(',') {
                item.insert(n.trim().to_string(), module.to_string());
            }
        }
    }
    // Multi-line `pub use m::{...}` groups.
    let mut rest = root_text.as_str();
    while let Some(at) = rest.find("pub use ") {
        rest = &rest[at + "pub use ".len()..];
        let Some((module, after)) = rest.split_once("::{") else { break };
        if module.contains(char::is_whitespace) {
            continue;
        }
        let end = after.find('}').unwrap_or(0);
        for n in after[..end].split(',') {
            item.insert(n.trim().to_string(), module.to_string());
        }
    }
    let mut g: BTreeMap<String, BTreeSet<String>> = tops.iter().map(|t| (t.clone(), BTreeSet::new())).collect();
    for (from, names) in &refs {
        for n in names {
            let to = if tops.contains(n) { Some(n.clone()) } else { item.get(n).cloned() };
            if let Some(to) = to.filter(|t| t != from && tops.contains(t)) {
                g.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    g
}

/// The strongly connected components of more than one module (Tarjan).
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        idx: HashMap<&'a str, usize>,
        low: HashMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let n = t.idx.len();
        t.idx.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g[v].iter() {
            let w = w.as_str();
            if !t.idx.contains_key(w) {
                visit(t, w);
                let l = t.low[v].min(t.low[w]);
                t.low.insert(v, l);
            } else if t.on.contains(w) {
                let l = t.low[v].min(t.idx[w]);
                t.low.insert(v, l);
            }
        }
        if t.low[v] == t.idx[v] {
            let mut scc = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                scc.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                t.out.push(scc);
            }
        }
    }
    let mut t =
        T { g, idx: HashMap::new(), low: HashMap::new(), stack: Vec::new(), on: BTreeSet::new(), out: Vec::new() };
    for v in g.keys() {
        if !t.idx.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn no_crate_imports_in_a_cycle() {
    let mut found = Vec::new();
    for krate in ["privlink-core", "privlink-config", "privlink"] {
        let src = workspace().join("crates").join(krate).join("src");
        let g = graph(&src);
        assert!(g.len() > 1 || krate == "privlink-config", "{krate}: no modules found in {}", src.display());
        for c in cycles(&g) {
            let edges: Vec<String> = c
                .iter()
                .map(|m| format!("{m} -> {:?}", g[m].iter().filter(|x| c.contains(x)).collect::<Vec<_>>()))
                .collect();
            found.push(format!("{krate}: {}", edges.join("; ")));
        }
    }
    assert!(found.is_empty(), "module cycles:\n{}", found.join("\n"));
}

#[test]
fn the_check_finds_a_cycle_when_there_is_one() {
    // Two modules that use each other, and a third only used.
    let dir = std::env::temp_dir().join(format!("privlink-modgraph-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("a")).expect("dir");
    std::fs::write(src.join("lib.rs"), "mod a;\nmod b;\nmod c;\npub use c::Thing;\n").expect("lib");
    std::fs::write(src.join("a/mod.rs"), "use crate::b::B;\nmod inner;\n").expect("a");
    std::fs::write(src.join("a/inner.rs"), "use crate::Thing;\n").expect("a/inner");
    std::fs::write(src.join("b.rs"), "use crate::{a::inner, c};\n#[cfg(test)]\nmod tests { use crate::c; }\n")
        .expect("b");
    std::fs::write(src.join("c.rs"), "pub struct Thing;\n// crate::a in a comment is no edge\n").expect("c");
    let g = graph(&src);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(g["a"], ["b", "c"].iter().map(|s| s.to_string()).collect());
    assert_eq!(g["c"], BTreeSet::new());
    assert_eq!(cycles(&g), vec![vec!["a".to_string(), "b".to_string()]]);
}
