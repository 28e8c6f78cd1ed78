//! `cargo xtask layout`: the structure rules, checked. Every `src/` of the workspace members
//! is read (not tests/, fuzz/ or target/); it fails on an import cycle between files or a file
//! over [`MAX_LINES`] lines.
//!
//! The graph is between files. A file's module comes from its place (`src/lib.rs` and
//! `src/main.rs` are the crate root, `a/mod.rs` is `a`, `a/b.rs` is `a::b`); a crate is the
//! files its root reaches through `mod x;`. Edges come from `use crate::`/`super::`/`self::`
//! (braces included; a path that starts with a child module's name is `self::`) and from
//! paths in code (`crate::a::f()`, `super::X`). A path goes to the file that defines its item:
//! the longest known module prefix, then the item named after it; if that module only imports
//! the name (`use x::Name`, `use x::Name as Y`, `use x::*`), the import is followed. `mod x;`
//! is no edge, nor is a module-level `pub use` itself (a re-export: whoever uses the name
//! depends on the defining file). Paths to other crates are not edges.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    path::Path,
};

use anyhow::{bail, Context as _};

use parse::{parse_file, FileFacts, Import, Module};

mod parse;

pub const MAX_LINES: usize = 600;

pub fn layout(root: &Path, edges: bool) -> anyhow::Result<()> {
    let files = read_sources(root)?;
    let a = analyze(&files);
    print!("{}", a.report(edges));
    let (cycles, long) = (a.cycles().len(), a.long_files().len());
    if cycles > 0 || long > 0 {
        bail!("layout: {cycles} import cycle(s), {long} file(s) over {MAX_LINES} lines");
    }
    Ok(())
}

/// `(path from the workspace root, text)` of every `.rs` file under each member's `src/`.
fn read_sources(root: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let manifest = fs::read_to_string(root.join("Cargo.toml"))?;
    let members = manifest
        .split_once("members = [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .context("no `members = [...]` in the workspace Cargo.toml")?
        .0;
    let mut out = Vec::new();
    for member in members.split('"').skip(1).step_by(2) {
        walk(root, &root.join(member).join("src"), &mut out)?;
    }
    out.sort();
    Ok(out)
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            walk(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            let name = path.strip_prefix(root)?.to_string_lossy().into_owned();
            out.push((name, fs::read_to_string(&path)?));
        }
    }
    Ok(())
}

// ---- the graph ------------------------------------------------------------------------------

#[derive(Default)]
struct ModInfo {
    /// Item name → the file that defines it.
    defs: HashMap<String, usize>,
    /// Module-level imports, resolved in this module.
    imports: Vec<Import>,
    children: BTreeSet<String>,
}

pub struct Analysis {
    files: Vec<(String, usize)>,
    /// (from, to) → the names that tie them.
    edges: BTreeMap<(usize, usize), BTreeSet<String>>,
    unreached: Vec<usize>,
}

/// The module of a file by its place: `c/src/a/b.rs` → `a::b`; `None` outside `src/`.
fn module_of(path: &str) -> Option<(String, Module)> {
    let (krate, rest) = path.split_once("/src/")?;
    let mut segs: Module = rest
        .trim_end_matches(".rs")
        .split('/')
        .map(String::from)
        .collect();
    if matches!(rest, "lib.rs" | "main.rs") || segs.last().is_some_and(|s| s == "mod") {
        segs.pop();
    }
    Some((krate.to_string(), segs))
}

pub fn analyze(sources: &[(String, String)]) -> Analysis {
    let files = sources
        .iter()
        .map(|(p, s)| (p.clone(), s.lines().count()))
        .collect();
    let facts: Vec<Option<(String, Module, FileFacts)>> = sources
        .iter()
        .map(|(p, s)| module_of(p).map(|(k, m)| (k.clone(), m.clone(), parse_file(&m, s))))
        .collect();
    let mut a = Analysis {
        files,
        edges: BTreeMap::new(),
        unreached: Vec::new(),
    };
    let mut reached = vec![false; sources.len()];
    for (root, (path, _)) in sources.iter().enumerate() {
        if path.ends_with("/src/lib.rs") || path.ends_with("/src/main.rs") {
            a.add_crate(sources, &facts, root, &mut reached);
        }
    }
    a.unreached = (0..sources.len()).filter(|&f| !reached[f]).collect();
    a
}

impl Analysis {
    /// The files `root` reaches through `mod x;`, their modules, and their edges.
    fn add_crate(
        &mut self,
        sources: &[(String, String)],
        facts: &[Option<(String, Module, FileFacts)>],
        root: usize,
        reached: &mut [bool],
    ) {
        let Some((krate, _, _)) = &facts[root] else {
            return;
        };
        let mut modules: HashMap<Module, ModInfo> = HashMap::new();
        let (mut members, mut queue) = (Vec::new(), vec![root]);
        while let Some(file) = queue.pop() {
            if members.contains(&file) {
                continue;
            }
            members.push(file);
            reached[file] = true;
            let (_, m, f) = facts[file].as_ref().expect("a source file");
            modules.entry(m.clone()).or_default();
            for (parent, name, inline) in &f.mods {
                modules
                    .entry(parent.clone())
                    .or_default()
                    .children
                    .insert(name.clone());
                let mut child = parent.clone();
                child.push(name.clone());
                modules.entry(child.clone()).or_default();
                if !inline {
                    let base = format!("{krate}/src/{}", child.join("/"));
                    let found = sources.iter().position(|(p, _)| {
                        *p == format!("{base}.rs") || *p == format!("{base}/mod.rs")
                    });
                    queue.extend(found);
                }
            }
        }
        for &file in &members {
            let (_, _, f) = facts[file].as_ref().expect("a source file");
            for (m, name) in &f.defs {
                modules
                    .entry(m.clone())
                    .or_default()
                    .defs
                    .insert(name.clone(), file);
            }
            for name in &f.exported_macros {
                modules
                    .entry(Vec::new())
                    .or_default()
                    .defs
                    .insert(name.clone(), file);
            }
            for (m, imp) in &f.imports {
                let abs = absolute(&modules, m, &imp.path);
                if let Some(path) = abs {
                    let imp = Import {
                        path,
                        name: imp.name.clone(),
                    };
                    modules.entry(m.clone()).or_default().imports.push(imp);
                }
            }
        }
        let module_files: HashMap<&Module, usize> = members
            .iter()
            .map(|&f| (&facts[f].as_ref().expect("a source file").1, f))
            .collect();
        for &file in &members {
            let (_, _, f) = facts[file].as_ref().expect("a source file");
            for (m, path) in &f.paths {
                let Some(abs) = absolute(&modules, m, path) else {
                    continue;
                };
                let r = Resolver {
                    modules: &modules,
                    module_files: &module_files,
                    file,
                };
                if let Some((to, name)) = r.target(&abs) {
                    if to != file {
                        self.edges.entry((file, to)).or_default().insert(name);
                    }
                }
            }
        }
    }
}

/// `path` as written in module `m`, from the crate root; `None`: another crate's.
fn absolute(modules: &HashMap<Module, ModInfo>, m: &Module, path: &[String]) -> Option<Module> {
    let mut out = m.clone();
    let mut segs = path.iter().peekable();
    match segs.peek()?.as_str() {
        "crate" => {
            out.clear();
            segs.next();
        }
        "self" => {
            segs.next();
        }
        "super" => {
            while segs.peek().is_some_and(|s| *s == "super") {
                out.pop();
                segs.next();
            }
        }
        first if modules.get(m).is_some_and(|i| i.children.contains(first)) => {}
        _ => return None,
    }
    out.extend(segs.cloned());
    Some(out)
}

struct Resolver<'a> {
    modules: &'a HashMap<Module, ModInfo>,
    /// The file of each module that has one (inline modules live in their parent's file).
    module_files: &'a HashMap<&'a Module, usize>,
    file: usize,
}

impl Resolver<'_> {
    /// The file `abs` leads to, and the name that ties it.
    fn target(&self, abs: &[String]) -> Option<(usize, String)> {
        self.follow(abs, &mut Vec::new())
    }

    fn follow(&self, abs: &[String], seen: &mut Vec<(Module, String)>) -> Option<(usize, String)> {
        let k = (0..=abs.len())
            .rev()
            .find(|&k| self.modules.contains_key(&abs[..k]))?;
        let module = abs[..k].to_vec();
        match abs.get(k) {
            None => Some((
                self.file_of(&module),
                abs.last().cloned().unwrap_or("crate".into()),
            )),
            Some(name) => {
                let to = self.item(&module, name, seen);
                Some((to.unwrap_or_else(|| self.file_of(&module)), name.clone()))
            }
        }
    }

    /// The file of a module: its own, or for an inline module the file of the closest parent.
    fn file_of(&self, module: &[String]) -> usize {
        (0..=module.len())
            .rev()
            .find_map(|k| self.module_files.get(&module[..k].to_vec()).copied())
            .unwrap_or(self.file)
    }

    /// The file that defines `name` as seen from `module`, through its imports.
    fn item(&self, module: &Module, name: &str, seen: &mut Vec<(Module, String)>) -> Option<usize> {
        let info = self.modules.get(module)?;
        if let Some(&file) = info.defs.get(name) {
            return Some(file);
        }
        let key = (module.clone(), name.to_string());
        if seen.contains(&key) {
            return None;
        }
        seen.push(key);
        for imp in info
            .imports
            .iter()
            .filter(|i| i.name.as_deref() == Some(name))
        {
            if let Some((file, _)) = self.follow(&imp.path, seen) {
                return Some(file);
            }
        }
        for imp in info.imports.iter().filter(|i| i.name.is_none()) {
            if let Some(file) = self.item(&imp.path, name, seen) {
                return Some(file);
            }
        }
        None
    }
}

impl Analysis {
    /// Strongly connected components of more than one file (Tarjan), each sorted.
    pub fn cycles(&self) -> Vec<Vec<usize>> {
        struct Tarjan<'a> {
            next: &'a BTreeMap<usize, Vec<usize>>,
            index: Vec<Option<usize>>,
            low: Vec<usize>,
            stack: Vec<usize>,
            on_stack: Vec<bool>,
            counter: usize,
            out: Vec<Vec<usize>>,
        }
        impl Tarjan<'_> {
            fn visit(&mut self, v: usize) {
                self.index[v] = Some(self.counter);
                self.low[v] = self.counter;
                self.counter += 1;
                self.stack.push(v);
                self.on_stack[v] = true;
                for &w in self.next.get(&v).into_iter().flatten() {
                    match self.index[w] {
                        None => {
                            self.visit(w);
                            self.low[v] = self.low[v].min(self.low[w]);
                        }
                        Some(iw) if self.on_stack[w] => self.low[v] = self.low[v].min(iw),
                        Some(_) => {}
                    }
                }
                if Some(self.low[v]) == self.index[v] {
                    let mut scc = Vec::new();
                    while let Some(w) = self.stack.pop() {
                        self.on_stack[w] = false;
                        scc.push(w);
                        if w == v {
                            break;
                        }
                    }
                    if scc.len() > 1 {
                        scc.sort();
                        self.out.push(scc);
                    }
                }
            }
        }
        let mut next: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for &(from, to) in self.edges.keys() {
            next.entry(from).or_default().push(to);
        }
        let n = self.files.len();
        let mut t = Tarjan {
            next: &next,
            index: vec![None; n],
            low: vec![0; n],
            stack: Vec::new(),
            on_stack: vec![false; n],
            counter: 0,
            out: Vec::new(),
        };
        for v in 0..n {
            if t.index[v].is_none() {
                t.visit(v);
            }
        }
        t.out.sort();
        t.out
    }

    pub fn long_files(&self) -> Vec<&(String, usize)> {
        self.files.iter().filter(|(_, n)| *n > MAX_LINES).collect()
    }

    fn edge_line(&self, from: usize, to: usize, names: &BTreeSet<String>) -> String {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        format!(
            "{} -> {}: {}",
            self.files[from].0,
            self.files[to].0,
            names.join(", ")
        )
    }

    pub fn report(&self, all_edges: bool) -> String {
        let mut out = String::new();
        if all_edges {
            for ((from, to), names) in &self.edges {
                out += &format!("edge {}\n", self.edge_line(*from, *to, names));
            }
        }
        let cycles = self.cycles();
        for (n, scc) in cycles.iter().enumerate() {
            out += &format!("cycle {} ({} files):\n", n + 1, scc.len());
            for ((from, to), names) in &self.edges {
                if scc.contains(from) && scc.contains(to) {
                    out += &format!("  {}\n", self.edge_line(*from, *to, names));
                }
            }
        }
        for (path, lines) in self.long_files() {
            out += &format!("over {MAX_LINES} lines: {path} ({lines} lines)\n");
        }
        for &f in &self.unreached {
            out += &format!(
                "note: {} is in no crate (no `mod` reaches it)\n",
                self.files[f].0
            );
        }
        let (max_path, max) = self
            .files
            .iter()
            .max_by_key(|(p, n)| (*n, std::cmp::Reverse(p.clone())))
            .map_or(("-", 0), |(p, n)| (p.as_str(), *n));
        out += &format!(
            "layout: {} files, {} import edges between them, max {max} lines ({max_path}), \
             {} file(s) over {MAX_LINES}, {} cycle(s)\n",
            self.files.len(),
            self.edges.len(),
            self.long_files().len(),
            cycles.len()
        );
        out
    }
}

#[cfg(test)]
mod tests;
