//! The source keeps its layering and has no import loops (docs/architecture.md, "Layering").
//!
//! Every `.rs` file under `src/` is read as text and turned into a file → file graph: an edge
//! for each `use crate::…`, `use super::…`, `use self::…` (nested groups included) and for each
//! path written in code (`crate::a::b::f()`, `super::x::Y`, `$crate::…`; `shers::…` in
//! `src/main.rs`), including a path that starts with a name a `use` bound (`use crate::http;`
//! then `http::internal::routes(cfg)` leads to `src/http/internal.rs`). A path goes to the
//! deepest file that exists (`crate::a::b::C` is `src/a/b.rs` or `src/a/b/mod.rs`, else
//! `src/a.rs` or `src/a/mod.rs`, else `src/lib.rs`) and no further: an edge to a `mod.rs` that
//! re-exports something stays an edge to that `mod.rs`.
//!
//! Not edges: `mod x;` declarations; a file's paths to itself and to its own folder's module
//! file (`src/a/b.rs` → `src/a/mod.rs` or `src/a.rs`; a top-level file → `src/lib.rs`); paths
//! that start with a bare name no `use` bound: an external crate, or a module's paths to its
//! own children (`pub use actor::*;` in a `mod.rs`). Counting those would follow every facade's
//! re-exports to all of its children, which is resolving re-exports further, and coarsely: the
//! `actors/incident` and `actors/unit` facades would then join eight actor files into a loop
//! that the definitions do not make (`unit/crew.rs` imports `billing.rs`, which takes from
//! `actors::unit` only what `fleet.rs`, `actor.rs` and `inspect.rs` define). Comments, string and character literals are
//! blanked before reading, and so is every item under exactly `#[cfg(test)]` (an inline
//! `mod tests { … }`, a `use`, a function) and every file that a `#[cfg(test)] mod x;`
//! declares: test code may reach anywhere.
//!
//! The checks: no strongly connected component of more than one file (an import loop, however
//! long), `domain/` imports no other area of the crate, and nothing outside `src/cluster/` but
//! the command line (`src/cli.rs`, `src/main.rs`) imports the cluster. Any finding fails it
//! (but those listed in [`KNOWN_CYCLES`] and [`KNOWN_LAYERING`], both empty), and so does a
//! listed one that no longer occurs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

/// Import loops tolerated, each as its sorted set of files: none, and it stays so. The list
/// (and [`KNOWN_LAYERING`]) exists so that a reshaping that cannot cut a loop in one step
/// lands with the loop named here; the check fails on a listed loop that no longer occurs.
const KNOWN_CYCLES: &[&[&str]] = &[];

/// Layering violations tolerated, each as `(importing file, imported file)`: none, as for
/// [`KNOWN_CYCLES`].
const KNOWN_LAYERING: &[(&str, &str)] = &[];

/// Areas `domain/` may import besides itself and the crate root. Empty: the domain imported
/// no other area (not even `config`) when this check was written, and stays pure.
const DOMAIN_MAY_IMPORT: &[&str] = &[];

/// Areas that may import `src/cluster/`: the cluster itself, the command line that starts it,
/// and the crate roots.
const CLUSTER_IMPORTED_BY: &[&str] = &["cluster", "cli", "lib", "main"];

// ---------------------------------------------------------------------------------------------
// Reading the source
// ---------------------------------------------------------------------------------------------

/// `src` with every comment, string literal and character literal replaced by spaces (line
/// breaks kept), so that nothing in them reads as a path.
fn blank_comments_and_literals(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |out: &mut String, chars: &[char]| {
        for &ch in chars {
            out.push(if ch == '\n' { '\n' } else { ' ' });
        }
    };
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied();
        let after_ident = i > 0 && is_ident_char(c[i - 1]);
        if ch == '/' && next == Some('/') {
            let end = c[i..]
                .iter()
                .position(|&x| x == '\n')
                .map_or(c.len(), |p| i + p);
            blank(&mut out, &c[i..end]);
            i = end;
            continue;
        }
        if ch == '/' && next == Some('*') {
            let mut depth = 0usize;
            let mut j = i;
            while j < c.len() {
                if c[j] == '/' && c.get(j + 1) == Some(&'*') {
                    depth += 1;
                    j += 2;
                } else if c[j] == '*' && c.get(j + 1) == Some(&'/') {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            let end = j.min(c.len());
            blank(&mut out, &c[i..end]);
            i = end;
            continue;
        }
        // Raw strings: r"…", r#"…"#, br"…", cr#"…"#.
        if !after_ident && (ch == 'r' || (matches!(ch, 'b' | 'c') && next == Some('r'))) {
            let mut j = if ch == 'r' { i + 1 } else { i + 2 };
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) == Some(&'"') {
                j += 1;
                while j < c.len() {
                    if c[j] == '"' && (1..=hashes).all(|k| c.get(j + k) == Some(&'#')) {
                        j += 1 + hashes;
                        break;
                    }
                    j += 1;
                }
                let end = j.min(c.len());
                blank(&mut out, &c[i..end]);
                i = end;
                continue;
            }
        }
        if ch == '"' {
            let mut j = i + 1;
            while j < c.len() {
                match c[j] {
                    '\\' => j += 2,
                    '"' => {
                        j += 1;
                        break;
                    }
                    _ => j += 1,
                }
            }
            let end = j.min(c.len());
            blank(&mut out, &c[i..end]);
            i = end;
            continue;
        }
        if ch == '\'' {
            // A character literal ('x', '\n', '\'', '\u{1F600}'), else a lifetime or label.
            let end = if next == Some('\\') {
                let from = (i + 3).min(c.len());
                c[from..]
                    .iter()
                    .position(|&x| x == '\'')
                    .map(|p| from + p + 1)
            } else if c.get(i + 2) == Some(&'\'') {
                Some(i + 3)
            } else {
                None
            };
            if let Some(end) = end {
                let end = end.min(c.len());
                blank(&mut out, &c[i..end]);
                i = end;
                continue;
            }
        }
        out.push(ch);
        i += 1;
    }
    out
}

fn is_ident_char(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// A token of blanked source: all the reader needs to see paths, braces and attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    /// `::`
    PathSep,
    /// A number (kept apart so that `1.0` is not read as anything else).
    Number,
    Punct(char),
}

impl Tok {
    fn is_ident(&self, name: &str) -> bool {
        matches!(self, Tok::Ident(s) if s == name)
    }
}

fn tokenize(code: &str) -> Vec<Tok> {
    let c: Vec<char> = code.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch.is_alphabetic() || ch == '_' {
            let start = i;
            while i < c.len() && is_ident_char(c[i]) {
                i += 1;
            }
            toks.push(Tok::Ident(c[start..i].iter().collect()));
        } else if ch.is_ascii_digit() {
            while i < c.len() && is_ident_char(c[i]) {
                i += 1;
            }
            toks.push(Tok::Number);
        } else if ch == ':' && c.get(i + 1) == Some(&':') {
            toks.push(Tok::PathSep);
            i += 2;
        } else {
            toks.push(Tok::Punct(ch));
            i += 1;
        }
    }
    toks
}

/// `toks` without the items under `#[cfg(test)]`, and the names of the `#[cfg(test)] mod x;`
/// declarations among them (whole test-only files).
///
/// The attribute must read exactly `#[cfg(test)]`; the item it governs is skipped together
/// with the attributes after it, up to its `;` or through its `{ … }` block (a module, a
/// function, an impl, a `use`). `#[cfg(any(test, …))]` and `#![cfg(test)]` are not recognised:
/// code under them is read as ordinary code, which can only report too much, never too little.
fn drop_cfg_test(toks: &[Tok]) -> (Vec<Tok>, Vec<String>) {
    let cfg_test = [
        Tok::Punct('#'),
        Tok::Punct('['),
        Tok::Ident("cfg".into()),
        Tok::Punct('('),
        Tok::Ident("test".into()),
        Tok::Punct(')'),
        Tok::Punct(']'),
    ];
    let mut kept = Vec::with_capacity(toks.len());
    let mut test_mods = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        if !toks[i..].starts_with(&cfg_test) {
            kept.push(toks[i].clone());
            i += 1;
            continue;
        }
        let mut j = i + cfg_test.len();
        // Further attributes on the same item.
        while toks.get(j) == Some(&Tok::Punct('#')) && toks.get(j + 1) == Some(&Tok::Punct('[')) {
            j = skip_group(toks, j + 1);
        }
        // `[pub[(…)]] mod name ;` declares a test-only file.
        let mut k = j;
        if toks.get(k).is_some_and(|t| t.is_ident("pub")) {
            k += 1;
            if toks.get(k) == Some(&Tok::Punct('(')) {
                k = skip_group(toks, k);
            }
        }
        if toks.get(k).is_some_and(|t| t.is_ident("mod"))
            && toks.get(k + 2) == Some(&Tok::Punct(';'))
            && let Some(Tok::Ident(name)) = toks.get(k + 1)
        {
            test_mods.push(name.clone());
        }
        // Skip the item: up to a `;` outside brackets, or through the first `{ … }`.
        let mut depth = 0usize;
        while j < toks.len() {
            match toks[j] {
                Tok::Punct('(') | Tok::Punct('[') => depth += 1,
                Tok::Punct(')') | Tok::Punct(']') => depth = depth.saturating_sub(1),
                Tok::Punct(';') if depth == 0 => {
                    j += 1;
                    break;
                }
                Tok::Punct('{') if depth == 0 => {
                    j = skip_group(toks, j);
                    break;
                }
                _ => {}
            }
            j += 1;
        }
        i = j;
    }
    (kept, test_mods)
}

/// The index just past the bracket group that opens at `open` (`(`, `[` or `{`).
fn skip_group(toks: &[Tok], open: usize) -> usize {
    let mut depth = 0usize;
    let mut j = open;
    while j < toks.len() {
        match toks[j] {
            Tok::Punct('(') | Tok::Punct('[') | Tok::Punct('{') => depth += 1,
            Tok::Punct(')') | Tok::Punct(']') | Tok::Punct('}') => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
        j += 1;
    }
    toks.len()
}

/// One path found in a file: the module it was written in (the file's module plus any inline
/// `mod x { … }` around it), its segments as written, and the name it imports (the last
/// segment, `*` for a glob, the module's name for `self` in a group).
#[derive(Debug, Clone)]
struct PathRef {
    module: Vec<String>,
    segments: Vec<String>,
    name: String,
}

/// One tree of a `use` declaration: its segments, the name it imports and the name it binds
/// (the alias after `as`, else the imported name; none for a glob or `as _`).
#[derive(Debug)]
struct UseTree {
    segments: Vec<String>,
    name: String,
    binds: Option<String>,
}

/// Every path in `toks` (already without tests) that starts at one of `roots`
/// (`crate`/`self`/`super`, or `shers` in the binary), from `use` declarations and from code;
/// and every path in code that starts with a name such a `use` bound (`use crate::http;` then
/// `http::internal::routes()` is a path to `crate::http::internal`). Bound names are taken as
/// valid in the whole file, whatever block the `use` sits in.
fn paths_in(toks: &[Tok], file_module: &[String], roots: &[&str]) -> Vec<PathRef> {
    let is_root = |s: &str| roots.contains(&s);
    let mut uses: Vec<(Vec<String>, UseTree)> = Vec::new();
    // Paths in code: the module they sit in and their segments.
    let mut in_code: Vec<(Vec<String>, Vec<String>)> = Vec::new();
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let module = |inline: &[(String, usize)]| {
        let mut m = file_module.to_vec();
        m.extend(inline.iter().map(|(name, _)| name.clone()));
        m
    };
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Ident(kw) if kw == "mod" => {
                if let (Some(Tok::Ident(name)), Some(Tok::Punct('{'))) =
                    (toks.get(i + 1), toks.get(i + 2))
                {
                    inline.push((name.clone(), depth));
                    i += 2;
                    continue;
                }
            }
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            Tok::Ident(kw) if kw == "use" => {
                i += 1;
                let mut trees = Vec::new();
                parse_use_tree(toks, &mut i, &[], &mut trees);
                let here = module(&inline);
                uses.extend(trees.into_iter().map(|t| (here.clone(), t)));
                continue;
            }
            Tok::Ident(first)
                if toks.get(i + 1) == Some(&Tok::PathSep)
                    && (i == 0 || toks[i - 1] != Tok::PathSep) =>
            {
                // `$crate` is `crate` wherever the macro is used.
                let mut segments = vec![first.clone()];
                let mut j = i + 1;
                while toks.get(j) == Some(&Tok::PathSep) {
                    match toks.get(j + 1) {
                        Some(Tok::Ident(s)) => {
                            segments.push(s.clone());
                            j += 2;
                        }
                        _ => break,
                    }
                }
                in_code.push((module(&inline), segments));
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }

    let mut found = Vec::new();
    // Names bound by `use`, as the path they stand for (in the module the `use` sits in).
    let mut bound: BTreeMap<String, PathRef> = BTreeMap::new();
    let expand = |module: &[String], segments: &[String], bound: &BTreeMap<_, PathRef>| {
        let first = segments.first()?;
        if is_root(first) {
            Some((module.to_vec(), segments.to_vec()))
        } else {
            let alias: &PathRef = bound.get(first)?;
            let mut full = alias.segments.clone();
            full.extend_from_slice(&segments[1..]);
            Some((alias.module.clone(), full))
        }
    };
    // Rooted uses first, then uses that start with a name those bound (one level).
    for pass in 0..2 {
        for (module, tree) in &uses {
            let rooted = tree.segments.first().is_some_and(|s| is_root(s));
            if rooted != (pass == 0) {
                continue;
            }
            let Some((module, segments)) = expand(module, &tree.segments, &bound) else {
                continue;
            };
            let path = PathRef {
                module,
                segments,
                name: tree.name.clone(),
            };
            if let Some(binds) = &tree.binds {
                bound.entry(binds.clone()).or_insert_with(|| path.clone());
            }
            found.push(path);
        }
    }
    for (module, segments) in in_code {
        if let Some((module, segments)) = expand(&module, &segments, &bound) {
            let name = segments.last().cloned().unwrap_or_default();
            found.push(PathRef {
                module,
                segments,
                name,
            });
        }
    }
    found
}

/// Reads one use tree at `*i` (after `use`, or inside a group) and appends each imported path.
/// Leaves `*i` after the tree.
fn parse_use_tree(toks: &[Tok], i: &mut usize, prefix: &[String], out: &mut Vec<UseTree>) {
    let mut segments = prefix.to_vec();
    if toks.get(*i) == Some(&Tok::PathSep) {
        // `use ::extern_crate::…`: never a path into this crate.
        segments.push("::".into());
        *i += 1;
    }
    loop {
        match toks.get(*i) {
            Some(Tok::Ident(s)) => {
                let s = s.clone();
                *i += 1;
                if toks.get(*i) == Some(&Tok::PathSep) {
                    segments.push(s);
                    *i += 1;
                    continue;
                }
                let name = if s == "self" {
                    segments.last().cloned().unwrap_or(s.clone())
                } else {
                    s.clone()
                };
                segments.push(s);
                let mut binds = Some(name.clone());
                if toks.get(*i).is_some_and(|t| t.is_ident("as")) {
                    binds = match toks.get(*i + 1) {
                        Some(Tok::Ident(alias)) if alias != "_" => Some(alias.clone()),
                        _ => None,
                    };
                    *i += 2;
                }
                out.push(UseTree {
                    segments,
                    name,
                    binds,
                });
                return;
            }
            Some(Tok::Punct('*')) => {
                *i += 1;
                out.push(UseTree {
                    segments,
                    name: "*".into(),
                    binds: None,
                });
                return;
            }
            Some(Tok::Punct('{')) => {
                *i += 1;
                while *i < toks.len() {
                    if toks[*i] == Tok::Punct('}') {
                        *i += 1;
                        break;
                    }
                    let before = *i;
                    parse_use_tree(toks, i, &segments, out);
                    if toks.get(*i) == Some(&Tok::Punct(',')) {
                        *i += 1;
                    }
                    if *i == before {
                        *i += 1;
                    }
                }
                return;
            }
            _ => return,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The graph
// ---------------------------------------------------------------------------------------------

/// Imports between files: importing file → imported file → the names imported.
type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

/// The module path of a file (`src/a/b.rs` and `src/a/b/mod.rs` are `a::b`, `src/lib.rs` is
/// the crate), or `None` for a file outside the library's module tree (`src/main.rs`).
fn module_of(file: &str) -> Option<Vec<String>> {
    let rel = file.strip_prefix("src/")?.strip_suffix(".rs")?;
    if rel == "main" {
        return None;
    }
    if rel == "lib" {
        return Some(Vec::new());
    }
    let mut segments: Vec<String> = rel.split('/').map(str::to_owned).collect();
    if segments.last().is_some_and(|s| s == "mod") {
        segments.pop();
    }
    Some(segments)
}

/// The file → file graph of a source tree given as `(path under the crate, contents)`.
fn graph_of(files: &[(String, String)]) -> Graph {
    let modules: BTreeMap<Vec<String>, String> = files
        .iter()
        .filter_map(|(path, _)| Some((module_of(path)?, path.clone())))
        .collect();
    let toks: Vec<(String, Vec<Tok>, Vec<String>)> = files
        .iter()
        .map(|(path, src)| {
            let (toks, test_mods) = drop_cfg_test(&tokenize(&blank_comments_and_literals(src)));
            (path.clone(), toks, test_mods)
        })
        .collect();
    let test_only: Vec<Vec<String>> = toks
        .iter()
        .flat_map(|(path, _, test_mods)| {
            let parent = module_of(path).unwrap_or_default();
            test_mods.iter().map(move |name| {
                let mut m = parent.clone();
                m.push(name.clone());
                m
            })
        })
        .collect();

    let mut graph = Graph::new();
    for (path, toks, _) in &toks {
        let own_module = module_of(path);
        if own_module
            .as_ref()
            .is_some_and(|m| test_only.iter().any(|t| m.starts_with(t)))
        {
            continue;
        }
        // In the binary, `crate` is the binary itself; the library is `shers`.
        let (file_module, roots): (Vec<String>, &[&str]) = match own_module {
            Some(m) => (m, &["crate", "self", "super"]),
            None => (Vec::new(), &["shers"]),
        };
        let folder_owner = Path::new(path)
            .parent()
            .and_then(|dir| {
                let rel = dir.strip_prefix("src").ok()?;
                let key: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                modules.get(&key).cloned()
            })
            .unwrap_or_default();
        graph.entry(path.clone()).or_default();
        for found in paths_in(toks, &file_module, roots) {
            let Some((target, name)) = resolve(&modules, &found) else {
                continue;
            };
            if target == *path || target == folder_owner {
                continue;
            }
            graph
                .entry(path.clone())
                .or_default()
                .entry(target)
                .or_default()
                .insert(name);
        }
    }
    graph
}

/// The file a path leads to (the deepest module file along it) and the name it imports from
/// that file.
fn resolve(modules: &BTreeMap<Vec<String>, String>, found: &PathRef) -> Option<(String, String)> {
    let mut segments = found.segments.iter();
    let mut abs: Vec<String> = match segments.next()?.as_str() {
        "crate" | "shers" => Vec::new(),
        "self" => found.module.clone(),
        "super" => {
            let mut m = found.module.clone();
            m.pop()?;
            m
        }
        _ => return None,
    };
    for s in segments {
        match s.as_str() {
            "self" => {}
            "super" => {
                abs.pop()?;
            }
            _ => abs.push(s.clone()),
        }
    }
    let depth = (0..=abs.len())
        .rev()
        .find(|&k| modules.contains_key(&abs[..k]))?;
    let file = modules.get(&abs[..depth])?.clone();
    let name = if found.name == "*" && depth == abs.len() {
        "*".to_owned()
    } else {
        abs.get(depth)
            .cloned()
            .unwrap_or_else(|| found.name.clone())
    };
    Some((file, name))
}

/// Reads every `.rs` file under `<crate>/src`, with paths like `src/a/b.rs`.
fn read_tree(root: &Path) -> Vec<(String, String)> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(root).unwrap();
                let rel = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                let text = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
                out.push((rel, text));
            }
        }
    }
    let mut out = Vec::new();
    walk(&root.join("src"), root, &mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// Findings
// ---------------------------------------------------------------------------------------------

/// Every strongly connected component of more than one file, each sorted (Tarjan's algorithm).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct Tarjan<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        found: Vec<Vec<String>>,
    }
    impl<'g> Tarjan<'g> {
        fn visit(&mut self, v: &'g str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flat_map(|t| t.keys()) {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w.to_owned());
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
    let mut tarjan = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !tarjan.index.contains_key(v.as_str()) {
            tarjan.visit(v);
        }
    }
    tarjan.found.sort();
    tarjan.found
}

/// The area of the crate a file belongs to: its first folder or file name under `src/`
/// (`domain`, `http`, `app`, `cli`, `lib`, `main`, …).
fn area(file: &str) -> &str {
    let rel = file.strip_prefix("src/").unwrap_or(file);
    let first = rel.split('/').next().unwrap_or(rel);
    first.strip_suffix(".rs").unwrap_or(first)
}

/// One import that breaks a layering rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Violation {
    from: String,
    to: String,
    rule: &'static str,
}

/// The imports that break a layering rule, in order.
fn layering_violations(graph: &Graph) -> Vec<Violation> {
    let mut found = Vec::new();
    for (from, targets) in graph {
        for to in targets.keys() {
            let (a, b) = (area(from), area(to));
            if a == "domain" && b != "domain" && b != "lib" && !DOMAIN_MAY_IMPORT.contains(&b) {
                found.push(Violation {
                    from: from.clone(),
                    to: to.clone(),
                    rule: "domain/ is pure: it imports no other area of the crate",
                });
            }
            if b == "cluster" && !CLUSTER_IMPORTED_BY.contains(&a) {
                found.push(Violation {
                    from: from.clone(),
                    to: to.clone(),
                    rule: "only the command line (src/cli.rs) imports src/cluster/",
                });
            }
        }
    }
    found.sort();
    found
}

/// `a -> b: names` for every edge of `graph` inside `files`, one a line.
fn describe_edges(graph: &Graph, files: &[String]) -> String {
    let mut out = String::new();
    for from in files {
        for (to, names) in graph.get(from).into_iter().flatten() {
            if files.contains(to) {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                let _ = writeln!(out, "    {from} -> {to}: {}", names.join(", "));
            }
        }
    }
    out
}

/// What the check reports against the known lists: empty when the tree matches them exactly.
fn compare(graph: &Graph, known_cycles: &[&[&str]], known_layering: &[(&str, &str)]) -> String {
    let mut report = String::new();
    let found_cycles = cycles(graph);
    let known: BTreeSet<Vec<String>> = known_cycles
        .iter()
        .map(|files| {
            let mut v: Vec<String> = files.iter().map(|f| (*f).to_owned()).collect();
            v.sort();
            v
        })
        .collect();
    for cycle in &found_cycles {
        if !known.contains(cycle) {
            let _ = writeln!(
                report,
                "import loop through {} files (nothing may import a module that imports it \
                 back; break it rather than listing it):\n{}",
                cycle.len(),
                describe_edges(graph, cycle)
            );
        }
    }
    for cycle in &known {
        if !found_cycles.contains(cycle) {
            let _ = writeln!(
                report,
                "KNOWN_CYCLES lists a loop that no longer occurs, remove it (or replace it by \
                 the smaller loop reported above): {cycle:?}\n"
            );
        }
    }
    let violations = layering_violations(graph);
    for v in &violations {
        if !known_layering.contains(&(v.from.as_str(), v.to.as_str())) {
            let names: Vec<&str> = graph[&v.from][&v.to].iter().map(String::as_str).collect();
            let _ = writeln!(
                report,
                "layering: {} -> {}: {} ({})\n",
                v.from,
                v.to,
                names.join(", "),
                v.rule
            );
        }
    }
    for (from, to) in known_layering {
        if !violations.iter().any(|v| v.from == *from && v.to == *to) {
            let _ = writeln!(
                report,
                "KNOWN_LAYERING lists an import that no longer occurs, remove it: \
                 (\"{from}\", \"{to}\")\n"
            );
        }
    }
    report
}

fn real_graph() -> Graph {
    graph_of(&read_tree(Path::new(env!("CARGO_MANIFEST_DIR"))))
}

// ---------------------------------------------------------------------------------------------
// The checks on the real tree
// ---------------------------------------------------------------------------------------------

#[test]
fn layering_and_loops_match_the_known_list() {
    let graph = real_graph();
    let report = compare(&graph, KNOWN_CYCLES, KNOWN_LAYERING);
    assert!(
        report.is_empty(),
        "the source breaks its layering (docs/architecture.md):\n\n{report}"
    );
}

#[test]
fn layering_reader_sees_the_real_tree() {
    let graph = real_graph();
    let files = graph.len();
    let edges: usize = graph.values().map(BTreeMap::len).sum();
    assert!(files > 80, "only {files} files read under src/");
    assert!(edges > 100, "only {edges} imports between files found");
    // Far more files import something than not; a reader that lost its way finds few.
    let silent = graph.values().filter(|t| t.is_empty()).count();
    assert!(
        silent * 3 < files,
        "{silent} of {files} files import nothing from the crate"
    );
}

// ---------------------------------------------------------------------------------------------
// The reader itself, on small trees
// ---------------------------------------------------------------------------------------------

fn tree(files: &[(&str, &str)]) -> Graph {
    let files: Vec<(String, String)> = files
        .iter()
        .map(|(p, s)| ((*p).to_owned(), (*s).to_owned()))
        .collect();
    graph_of(&files)
}

/// The edges of `graph` as `from -> to: names` lines, sorted.
fn edges(graph: &Graph) -> Vec<String> {
    graph
        .iter()
        .flat_map(|(from, targets)| {
            targets.iter().map(move |(to, names)| {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                format!("{from} -> {to}: {}", names.join(", "))
            })
        })
        .collect()
}

#[test]
fn layering_reader_follows_nested_use_groups() {
    let g = tree(&[
        ("src/lib.rs", "pub mod a; pub mod e; pub mod x;"),
        ("src/a/mod.rs", "pub mod b;"),
        ("src/a/b.rs", ""),
        ("src/e.rs", ""),
        (
            "src/x.rs",
            "pub use crate::{a::b::{C, D as Dee}, e::{self, F}};\n\
             pub(crate) use crate::a::{b::*};\n\
             use std::collections::HashMap;\n\
             use ::serde::Serialize;",
        ),
    ]);
    assert_eq!(
        edges(&g),
        [
            "src/x.rs -> src/a/b.rs: *, C, D",
            "src/x.rs -> src/e.rs: F, e",
        ]
    );
}

#[test]
fn layering_reader_resolves_super_self_and_the_deepest_file() {
    let g = tree(&[
        ("src/lib.rs", ""),
        ("src/a/mod.rs", ""),
        ("src/a/q.rs", ""),
        ("src/a/b/mod.rs", "use super::q::Up; use self::c::Down;"),
        ("src/a/b/c.rs", ""),
        (
            "src/a/b/d.rs",
            "use super::c::Sibling; use super::OwnFolder; use super::super::q::{Two};\n\
             use crate::a::b::c::deeper::Item; use crate::a::missing::Thing; use crate::Root;\n\
             use self::inner::Own;",
        ),
        ("src/sim/loadgen.rs", "use stats::Summary;"),
        (
            "src/sim/loadgen/stats.rs",
            "use super::Parent; use super::super::Sim;",
        ),
        ("src/sim/mod.rs", ""),
    ]);
    assert_eq!(
        edges(&g),
        [
            "src/a/b/d.rs -> src/a/b/c.rs: Sibling, deeper",
            "src/a/b/d.rs -> src/a/mod.rs: missing",
            "src/a/b/d.rs -> src/a/q.rs: Two",
            "src/a/b/d.rs -> src/lib.rs: Root",
            // mod.rs → its parent module counts (another folder); its own child too.
            "src/a/b/mod.rs -> src/a/b/c.rs: Down",
            "src/a/b/mod.rs -> src/a/q.rs: Up",
            // A file's own folder is owned by loadgen.rs, not by a mod.rs; `use stats::…`
            // (a bare child path) is no edge.
            "src/sim/loadgen/stats.rs -> src/sim/mod.rs: Sim",
        ]
    );
}

#[test]
fn layering_reader_follows_paths_in_code() {
    let g = tree(&[
        ("src/lib.rs", ""),
        ("src/a/mod.rs", ""),
        ("src/a/b.rs", ""),
        ("src/a/c.rs", ""),
        (
            "src/main.rs",
            "fn main() { shers::a::b::run(); crate::nothing(); }",
        ),
        (
            "src/a/d.rs",
            "#[derive(Debug)]\n\
             pub struct S { f: crate::a::b::Field<u8> }\n\
             fn g<'a>(x: &'a str) -> Result<(), super::c::Error> {\n\
                 let y = crate::a::b::Maker::<u8>::new();\n\
                 let z = <T as crate::a::c::Trait>::f();\n\
                 self::local(); Self::assoc(); pub(crate) fn h() {}\n\
                 Ok(())\n\
             }\n\
             mod inner { fn i() { super::super::c::Nested::go() } }\n\
             macro_rules! m { () => { $crate::a::b::Macro }; }",
        ),
    ]);
    assert_eq!(
        edges(&g),
        [
            "src/a/d.rs -> src/a/b.rs: Field, Macro, Maker",
            "src/a/d.rs -> src/a/c.rs: Error, Nested, Trait",
            "src/main.rs -> src/a/b.rs: run",
        ]
    );
}

#[test]
fn layering_reader_follows_paths_through_names_a_use_binds() {
    let g = tree(&[
        ("src/lib.rs", ""),
        ("src/http/mod.rs", ""),
        ("src/http/internal.rs", ""),
        ("src/a/mod.rs", ""),
        ("src/a/b.rs", ""),
        ("src/a/c.rs", ""),
        (
            "src/a/d.rs",
            "use crate::http;\n\
             use crate::a::{self as alpha};\n\
             use super::c as cc;\n\
             use crate::a::b::Thing;\n\
             use crate::a::c::Unused as _;\n\
             fn f() {\n\
                 http::internal::node_routes(cfg);\n\
                 alpha::b::Deep::go(); cc::Sub::new(); Thing::new();\n\
                 use http::internal as inner; inner::Again::x();\n\
                 fmt::Write::write_str(); std::mem::take(x); _::nothing();\n\
             }",
        ),
    ]);
    assert_eq!(
        edges(&g),
        [
            "src/a/d.rs -> src/a/b.rs: Deep, Thing",
            "src/a/d.rs -> src/a/c.rs: Sub, Unused, c",
            "src/a/d.rs -> src/http/internal.rs: Again, internal, node_routes",
            "src/a/d.rs -> src/http/mod.rs: http",
        ]
    );
}

#[test]
fn layering_reader_ignores_comments_strings_and_mod_declarations() {
    let g = tree(&[
        ("src/lib.rs", "pub mod a; pub mod z;"),
        ("src/a/mod.rs", "pub mod b;"),
        ("src/a/b.rs", ""),
        ("src/z.rs", ""),
        (
            "src/x.rs",
            "//! use crate::z::Inner;\n\
             /// crate::z::Doc\n\
             // use crate::z::Line;\n\
             /* crate::z::Block /* nested crate::z::Nested */ crate::z::After */\n\
             mod z; pub mod a;\n\
             const S: &str = \"crate::z::Str \\\" crate::z::Escaped\";\n\
             const R: &str = r#\"crate::z::Raw \"quoted\" \"#;\n\
             const B: &[u8] = br\"crate::z::Bytes\";\n\
             const Q: char = '\"'; const E: char = '\\''; const U: char = '\\u{22}';\n\
             fn f<'a>(s: &'a str) -> crate::a::b::Kept { todo!() }\n\
             const T: &str = \"ends here\"; fn g() -> crate::a::b::AlsoKept {}",
        ),
    ]);
    assert_eq!(edges(&g), ["src/x.rs -> src/a/b.rs: AlsoKept, Kept"]);
}

#[test]
fn layering_reader_leaves_out_test_code() {
    let g = tree(&[
        ("src/lib.rs", ""),
        (
            "src/a/mod.rs",
            "#[cfg(test)]\npub(crate) mod fake;\npub mod b;",
        ),
        ("src/a/b.rs", ""),
        ("src/a/fake.rs", "use crate::z::FromTestFile;"),
        ("src/a/fake/deeper.rs", "use crate::z::FromTestFolder;"),
        ("src/z.rs", ""),
        (
            "src/x.rs",
            "use crate::a::b::Before;\n\
             #[cfg(test)]\n#[allow(clippy::unwrap_used)]\n\
             mod tests { use super::*; use crate::z::InTests; fn t() { crate::z::f(); } }\n\
             #[cfg(test)] use crate::z::TestUse;\n\
             #[cfg(test)] fn helper() -> Vec<u8> { crate::z::helper() }\n\
             #[cfg(test)] mod binding_tests { mod props { use crate::z::Nested; } }\n\
             fn after() { crate::a::b::After::go() }\n\
             #[cfg(not(test))] fn kept() { crate::z::NotTest::go() }",
        ),
    ]);
    assert_eq!(
        edges(&g),
        [
            "src/x.rs -> src/a/b.rs: After, Before",
            "src/x.rs -> src/z.rs: NotTest",
        ]
    );
}

#[test]
fn layering_finds_loops_and_names_their_imports() {
    let g = tree(&[
        ("src/lib.rs", ""),
        (
            "src/app.rs",
            "use crate::http::Routes; fn f() { crate::domain::x::pure() }",
        ),
        ("src/http/mod.rs", "use crate::cluster::Node;"),
        (
            "src/cluster/mod.rs",
            "use crate::app::{Application, Config};",
        ),
        ("src/domain/x.rs", "use crate::config::Settings;"),
        ("src/config.rs", ""),
        ("src/cli.rs", "use crate::cluster::Node;"),
        ("src/actors/a.rs", "use super::b::B;"),
        ("src/actors/b.rs", "use super::a::A;"),
    ]);
    let loops = cycles(&g);
    assert_eq!(
        loops,
        [
            vec!["src/actors/a.rs", "src/actors/b.rs"],
            vec!["src/app.rs", "src/cluster/mod.rs", "src/http/mod.rs"],
        ]
    );
    assert_eq!(
        describe_edges(&g, &loops[1]),
        "    src/app.rs -> src/http/mod.rs: Routes\n    \
         src/cluster/mod.rs -> src/app.rs: Application, Config\n    \
         src/http/mod.rs -> src/cluster/mod.rs: Node\n"
    );
    let violations = layering_violations(&g);
    let pairs: Vec<(&str, &str)> = violations
        .iter()
        .map(|v| (v.from.as_str(), v.to.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("src/domain/x.rs", "src/config.rs"),
            ("src/http/mod.rs", "src/cluster/mod.rs"),
        ]
    );

    // Everything known: nothing to report.
    let known_cycles: &[&[&str]] = &[
        &["src/actors/b.rs", "src/actors/a.rs"],
        &["src/app.rs", "src/cluster/mod.rs", "src/http/mod.rs"],
    ];
    assert_eq!(compare(&g, known_cycles, &pairs), "");

    // A finding not listed fails, and so does a listed one that no longer occurs.
    let report = compare(&g, &known_cycles[..1], &pairs[..1]);
    assert!(report.contains("import loop through 3 files"), "{report}");
    assert!(
        report.contains("src/http/mod.rs -> src/cluster/mod.rs: Node"),
        "{report}"
    );
    assert!(
        report.contains("layering: src/http/mod.rs -> src/cluster/mod.rs"),
        "{report}"
    );
    let stale = compare(
        &tree(&[("src/lib.rs", ""), ("src/a.rs", "")]),
        &known_cycles[..1],
        &pairs[..1],
    );
    assert!(
        stale.contains("KNOWN_CYCLES lists a loop that no longer occurs"),
        "{stale}"
    );
    assert!(
        stale.contains("KNOWN_LAYERING lists an import that no longer occurs"),
        "{stale}"
    );
}
