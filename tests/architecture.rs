//! The structure `docs/ARCHITECTURE.md` describes, checked on the source itself: no import cycle
//! between the modules of `src/`, all SQL in `src/store/`, and the few layers that must stay
//! leaves. The source is read as text (no compiler involved): `use crate::…` and `use super::…`
//! trees and inline `crate::…` paths are resolved to the file of the module they name.
//!
//! A module is a file (`src/a.rs`, `src/a/mod.rs`, `src/a/b.rs`). A child naming its own
//! parent (`use super::Error` in `src/dingtalk/token.rs`) is not counted as an import: the
//! parent declares the child, they are one unit, and that is how Rust modules share private
//! items.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Every `.rs` file under `src/`, as its module path (`["store", "approvals"]`; the crate root is
/// `[]`) and its text.
fn modules() -> BTreeMap<Vec<String>, (PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let src: PathBuf = [env!("CARGO_MANIFEST_DIR"), "src"].iter().collect();
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut modules = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let mut path: Vec<String> = relative
            .iter()
            .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        if matches!(
            path.last().map(String::as_str),
            Some("mod" | "lib" | "main")
        ) {
            path.pop();
        }
        if relative == Path::new("main.rs") {
            // The binary is a crate of its own that uses the library by name.
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        modules.insert(path, (relative.to_path_buf(), text));
    }
    modules
}

/// The text without comments (line comments, doc comments, block comments) and string
/// literals, so that a path named in prose or SQL is not taken for an import.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let bytes: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let next = bytes.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < bytes.len() && bytes[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            i += 2;
            while i + 1 < bytes.len() && !(bytes[i] == '*' && bytes[i + 1] == '/') {
                i += 1;
            }
            i += 2;
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && !ident_char(i.checked_sub(1).and_then(|p| bytes.get(p)).copied())
        {
            // Raw string: r"…", r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while bytes.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if bytes.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= bytes.len() {
                    break;
                }
                if bytes[j] == '"' && (0..hashes).all(|h| bytes.get(j + 1 + h) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            i += 1;
            while i < bytes.len() && bytes[i] != '"' {
                if bytes[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' && next == Some('\\') {
            // An escaped char literal: '\n', '\'', '\u{1F600}'.
            let mut j = i + 3;
            while j < bytes.len() && bytes[j] != '\'' {
                j += 1;
            }
            i = j + 1;
            out.push_str("' '");
        } else if c == '\'' && bytes.get(i + 2) == Some(&'\'') {
            // A plain char literal such as '"' (a lifetime has no closing quote).
            i += 3;
            out.push_str("' '");
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident_char(c: Option<char>) -> bool {
    c.is_some_and(|c| c.is_alphanumeric() || c == '_')
}

/// Expands a use tree (`a::{b, c::{d, e}}`) into its paths.
fn expand(tree: &str) -> Vec<Vec<String>> {
    // Drop aliases (`a::b as c`) and then all white space.
    let mut tokens = tree.split_whitespace().peekable();
    let mut tree = String::new();
    while let Some(token) = tokens.next() {
        if token == "as" {
            if let Some(alias) = tokens.next() {
                tree.push_str(alias.trim_start_matches(|c: char| c.is_alphanumeric() || c == '_'));
            }
        } else {
            tree.push_str(token);
        }
    }
    fn go(prefix: &[String], tree: &str, out: &mut Vec<Vec<String>>) {
        if let Some(open) = tree.find('{') {
            let head: Vec<String> = tree[..open]
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            let inner = &tree[open + 1..tree.rfind('}').unwrap()];
            let mut depth = 0;
            let mut start = 0;
            let mut parts = Vec::new();
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        parts.push(&inner[start..i]);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            parts.push(&inner[start..]);
            let mut base = prefix.to_vec();
            base.extend(head);
            for part in parts.into_iter().filter(|p| !p.is_empty()) {
                go(&base, part, out);
            }
        } else {
            let mut path = prefix.to_vec();
            let item = tree;
            path.extend(
                item.split("::")
                    .filter(|s| !s.is_empty() && *s != "self" && *s != "*")
                    .map(str::to_string),
            );
            out.push(path);
        }
    }
    let mut out = Vec::new();
    go(&[], &tree, &mut out);
    out
}

/// The modules each module imports (by module path), ancestors left out.
fn imports(
    modules: &BTreeMap<Vec<String>, (PathBuf, String)>,
) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mut graph = BTreeMap::new();
    for (module, (file, text)) in modules {
        let code = code_only(text);
        // The module `super` names: the parent of a file module, or of a `mod.rs`'s own module.
        let _ = file;
        let parent: Vec<String> = module[..module.len().saturating_sub(1)].to_vec();
        let mut paths: Vec<Vec<String>> = Vec::new();
        // `use` statements (possibly over several lines).
        let mut rest = code.as_str();
        while let Some(at) = rest.find("use ") {
            let before = rest[..at].chars().last();
            rest = &rest[at + 4..];
            if ident_char(before) {
                continue;
            }
            let end = rest.find(';').unwrap_or(rest.len());
            let tree = &rest[..end];
            for path in expand(tree) {
                match path.first().map(String::as_str) {
                    Some("crate") => paths.push(path[1..].to_vec()),
                    Some("super") => {
                        let mut p = parent.clone();
                        p.extend(path[1..].iter().cloned());
                        paths.push(p);
                    }
                    _ => {}
                }
            }
        }
        // Inline paths: `crate::metrics::job_run(…)`.
        let mut rest = code.as_str();
        while let Some(at) = rest.find("crate::") {
            let before = rest[..at].chars().last();
            rest = &rest[at + 7..];
            if ident_char(before) {
                continue;
            }
            let path: Vec<String> = rest
                .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .next()
                .unwrap()
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            paths.push(path);
        }
        let mut targets = BTreeSet::new();
        for path in paths {
            // The longest prefix that is a module.
            let target = (0..=path.len())
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|p| modules.contains_key(p));
            let Some(target) = target else { continue };
            let is_ancestor = module.starts_with(&target);
            if !is_ancestor && &target != module {
                targets.insert(target);
            }
        }
        graph.insert(module.clone(), targets);
    }
    graph
}

fn name(module: &[String]) -> String {
    if module.is_empty() {
        "crate".into()
    } else {
        module.join("::")
    }
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        graph: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<&'a Vec<String>, usize>,
        low: BTreeMap<&'a Vec<String>, usize>,
        stack: Vec<&'a Vec<String>>,
        on_stack: BTreeSet<&'a Vec<String>>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a Vec<String>) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[w].min(self.low[v]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.index[w].min(self.low[v]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                loop {
                    let w = self.stack.pop().unwrap();
                    self.on_stack.remove(w);
                    component.push(name(w));
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    t.found
}

/// Every import of a module under the top-level module `top`: (importer, imported top-level
/// module, imported module).
fn imports_under<'a>(
    graph: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
    top: &'a str,
) -> impl Iterator<Item = (String, &'a str, String)> + 'a {
    graph
        .iter()
        .filter(move |(m, _)| m.first().map(String::as_str) == Some(top))
        .flat_map(|(m, targets)| {
            targets.iter().map(move |t| {
                let target_top = t.first().map(String::as_str).unwrap_or("crate");
                (name(m), target_top, name(t))
            })
        })
}

fn module(path: &str) -> Vec<String> {
    path.split("::").map(str::to_string).collect()
}

#[test]
fn no_module_of_src_imports_a_module_that_imports_it_back() {
    let graph = imports(&modules());
    // The reader must see the imports it is meant to: these are known edges.
    assert!(graph[&module("health")].contains(&module("store")));
    assert!(graph[&module("outbox")].contains(&module("dingtalk")));
    let found = cycles(&graph);
    assert!(
        found.is_empty(),
        "import cycles between modules of src/: {found:#?}"
    );
}

#[test]
fn the_cycle_check_finds_a_cycle_when_there_is_one() {
    let mut graph = imports(&modules());
    graph
        .get_mut(&module("metrics"))
        .unwrap()
        .insert(module("health"));
    let found = cycles(&graph);
    assert!(
        found
            .iter()
            .any(|c| c.iter().any(|m| m == "health") && c.iter().any(|m| m == "metrics")),
        "{found:?}"
    );
}

#[test]
fn leaves_import_nothing_of_the_daemon_above_them() {
    let graph = imports(&modules());
    let allowed: &[(&str, &[&str])] = &[
        // Series only; each domain passes its own labels in.
        ("metrics", &[]),
        // What an event means: pure.
        ("event", &[]),
        // A snapshot of DingTalk's, as the tables see it: data only.
        ("snapshot", &["event"]),
        // Read once at start-up.
        ("config", &["crypto"]),
        // Beijing days and months, the scaled clock: pure.
        ("clock", &[]),
        // Form schemas and the SQL of their views: pure.
        ("forms", &[]),
        // An operator's retry and cancel: the store's guarded changes and what they mean.
        ("operate", &["store"]),
    ];
    for (leaf, may) in allowed {
        let imported: Vec<String> = graph[&module(leaf)]
            .iter()
            .filter(|m| !may.contains(&name(m).as_str()))
            .map(|m| name(m))
            .collect();
        assert!(imported.is_empty(), "{leaf} imports {imported:?}");
    }
    // The store sits below every flow: it may know the configuration and the data it writes
    // (events and snapshots).
    for (m, top, t) in imports_under(&graph, "store") {
        assert!(
            matches!(top, "store" | "config" | "event" | "snapshot"),
            "{m} imports {t}: the store must not depend on the flows above it"
        );
    }
}

#[test]
fn all_sql_lives_in_the_store() {
    for (module, (file, text)) in modules() {
        if module.first().map(String::as_str) == Some("store") {
            continue;
        }
        for needle in ["sqlx::query", "query_as(", "query_scalar("] {
            assert!(
                !code_only(&text).contains(needle),
                "src/{} runs SQL ({needle}); SQL belongs in src/store/",
                file.display()
            );
        }
    }
}

#[test]
fn each_module_imports_nothing_docs_architecture_forbids_it() {
    let graph = imports(&modules());
    // The "must not import" column of docs/ARCHITECTURE.md's module map.
    let forbidden: &[(&str, &[&str])] = &[
        ("app", &["cli"]),
        // The console reads; what it may change is `operate`'s, and it runs no flow.
        (
            "console",
            &[
                "app",
                "cli",
                "callback",
                "ingest",
                "stream",
                "outbox",
                "actions",
                "reconcile",
                "retention",
                "scheduler",
                "planner",
                "jobs",
                "dingtalk",
                "demo",
            ],
        ),
        ("scheduler", &["app", "cli"]),
        ("callback", &["outbox", "reconcile", "dingtalk"]),
        ("error", &["outbox", "reconcile", "dingtalk"]),
        (
            "health",
            &["callback", "ingest", "outbox", "reconcile", "stream"],
        ),
        (
            "stream",
            &["callback", "outbox", "reconcile", "health", "scheduler"],
        ),
        ("outbox", &["callback", "ingest", "reconcile"]),
        ("reconcile", &["callback", "ingest", "outbox", "scheduler"]),
        ("retention", &["callback", "ingest", "outbox", "scheduler"]),
        ("jobs", &["reconcile", "retention"]),
        (
            "planner",
            &[
                "reconcile",
                "scheduler",
                "retention",
                "jobs",
                "dingtalk",
                "callback",
                "ingest",
                "outbox",
            ],
        ),
        ("ingest", &["callback", "dingtalk", "stream"]),
        (
            "dingtalk",
            &[
                "callback",
                "ingest",
                "outbox",
                "reconcile",
                "retention",
                "scheduler",
                "jobs",
            ],
        ),
        (
            "demo",
            &["callback", "ingest", "outbox", "reconcile", "dingtalk"],
        ),
        ("batching", &["store", "config", "metrics"]),
        (
            "ledger",
            &[
                "callback",
                "ingest",
                "outbox",
                "reconcile",
                "scheduler",
                "dingtalk",
                "health",
            ],
        ),
        (
            "config",
            &[
                "callback",
                "ingest",
                "outbox",
                "reconcile",
                "scheduler",
                "store",
                "dingtalk",
            ],
        ),
        (
            "telemetry",
            &[
                "callback",
                "ingest",
                "outbox",
                "reconcile",
                "scheduler",
                "store",
                "dingtalk",
            ],
        ),
    ];
    for (module_name, not) in forbidden {
        for (m, top, t) in imports_under(&graph, module_name) {
            assert!(
                !not.contains(&top),
                "{m} imports {t}, which docs/ARCHITECTURE.md forbids"
            );
        }
    }
}
