//! What one file says: its tokens (a small lexer), then its items, `mod`s, `use`s and paths.

/// A module's path from its crate root (`[]` is the root).
pub type Module = Vec<String>;

#[derive(Clone, Debug, PartialEq)]
pub enum Tok {
    Ident(String),
    /// `::`
    Sep,
    Punct(char),
}

/// Identifiers, `::` and punctuation; comments, strings, chars, lifetimes and numbers dropped.
pub fn tokens(src: &str) -> Vec<Tok> {
    let c: Vec<char> = src.chars().collect();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let ident_char = |ch: char| ch.is_alphanumeric() || ch == '_';
    let (mut out, mut i) = (Vec::new(), 0);
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            let (mut depth, mut j) = (1, i + 2);
            while j < c.len() && depth > 0 {
                match (c[j], at(j + 1)) {
                    ('/', '*') => (depth, j) = (depth + 1, j + 2),
                    ('*', '/') => (depth, j) = (depth - 1, j + 2),
                    _ => j += 1,
                }
            }
            i = j;
        } else if ch == '"' {
            i = skip_quoted(&c, i + 1, '"');
        } else if ch == '\'' {
            // 'x', '\n', '\u{..}' are chars; 'a (no closing quote right after) a lifetime.
            if at(i + 1) == '\\' || at(i + 2) == '\'' {
                i = skip_quoted(&c, i + 1, '\'');
            } else {
                i += 1;
                while ident_char(at(i)) {
                    i += 1;
                }
            }
        } else if ch.is_ascii_digit() {
            while ident_char(at(i)) || (at(i) == '.' && at(i + 1).is_ascii_digit()) {
                i += 1;
            }
        } else if ident_char(ch) {
            let start = i;
            while ident_char(at(i)) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let raw_prefix = matches!(word.as_str(), "r" | "br" | "cr");
            if raw_prefix && (at(i) == '"' || (at(i) == '#' && matches!(at(i + 1), '"' | '#'))) {
                let mut hashes = 0;
                while at(i) == '#' {
                    (hashes, i) = (hashes + 1, i + 1);
                }
                i += 1;
                while i < c.len() && !(c[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#')) {
                    i += 1;
                }
                i += 1 + hashes;
            } else if matches!(word.as_str(), "b" | "c") && matches!(at(i), '"' | '\'') {
                i = skip_quoted(&c, i + 1, at(i));
            } else if word == "r" && at(i) == '#' {
                i += 1; // r#ident: the identifier follows
            } else {
                out.push(Tok::Ident(word));
            }
        } else if ch == ':' && at(i + 1) == ':' {
            out.push(Tok::Sep);
            i += 2;
        } else {
            out.push(Tok::Punct(ch));
            i += 1;
        }
    }
    out
}

/// The index after the closing `quote`, from just after the opening one.
fn skip_quoted(c: &[char], mut i: usize, quote: char) -> usize {
    while i < c.len() && c[i] != quote {
        i += if c[i] == '\\' { 2 } else { 1 };
    }
    i + 1
}

/// One imported name: `use a::b::Name as Alias` (name `Alias`), or a glob (`name: None`).
#[derive(Clone, Debug)]
pub struct Import {
    pub path: Vec<String>,
    pub name: Option<String>,
}

#[derive(Debug, Default)]
pub struct FileFacts {
    /// Items defined at module level, by (module, inline modules included) name.
    pub defs: Vec<(Module, String)>,
    /// `#[macro_export] macro_rules!`: defined at the crate root.
    pub exported_macros: Vec<String>,
    /// `mod x;` (a file) and `mod x { .. }` (inline), by the module that declares them.
    pub mods: Vec<(Module, String, bool)>,
    /// Module-level `use`s (`pub` or not): other paths can go through them.
    pub imports: Vec<(Module, Import)>,
    /// Every path that makes an edge: (module it is written in, path).
    pub paths: Vec<(Module, Vec<String>)>,
}

const ITEMS: &[&str] = &[
    "struct", "enum", "fn", "trait", "type", "const", "static", "union",
];
const KEYWORDS: &[&str] = &[
    "fn", "mut", "unsafe", "async", "extern", "impl", "for", "dyn", "trait",
];

pub fn parse_file(module: &Module, src: &str) -> FileFacts {
    let t = tokens(src);
    let ident = |i: usize| match t.get(i) {
        Some(Tok::Ident(s)) => Some(s.as_str()),
        _ => None,
    };
    let mut f = FileFacts::default();
    // Inline modules open at a brace depth; items count only at their module's own depth.
    let mut scopes: Vec<(Module, usize)> = vec![(module.clone(), 0)];
    let (mut depth, mut i) = (0, 0);
    while i < t.len() {
        let (here, body) = scopes.last().cloned().expect("the file's module");
        let top = depth == body;
        match &t[i] {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                if depth == body && scopes.len() > 1 {
                    scopes.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Tok::Ident(w) if w == "mod" && top => {
                if let Some(name) = ident(i + 1) {
                    let inline = t.get(i + 2) == Some(&Tok::Punct('{'));
                    f.mods.push((here.clone(), name.to_string(), inline));
                    if inline {
                        let mut inner = here.clone();
                        inner.push(name.to_string());
                        depth += 1;
                        scopes.push((inner, depth));
                        i += 3;
                        continue;
                    }
                }
            }
            Tok::Ident(w) if w == "use" => {
                let is_pub = i >= 1 && is_pub_before(&t, i);
                i += 1;
                let mut leaves = Vec::new();
                use_tree(&t, &mut i, Vec::new(), &mut leaves);
                for leaf in leaves {
                    if top {
                        f.imports.push((here.clone(), leaf.clone()));
                    }
                    if !(top && is_pub) {
                        f.paths.push((here.clone(), leaf.path));
                    }
                }
                continue;
            }
            Tok::Ident(w) if w == "macro_rules" && t.get(i + 1) == Some(&Tok::Punct('!')) => {
                if let Some(name) = ident(i + 2) {
                    let exported = i >= 2 && ident(i - 2) == Some("macro_export");
                    if exported {
                        f.exported_macros.push(name.to_string());
                    } else {
                        f.defs.push((here.clone(), name.to_string()));
                    }
                }
            }
            // (`*const T` is a type, not an item)
            Tok::Ident(w)
                if top
                    && ITEMS.contains(&w.as_str())
                    && (i == 0 || t[i - 1] != Tok::Punct('*')) =>
            {
                let mut j = i + 1;
                while ident(j) == Some("mut") {
                    j += 1;
                }
                if let Some(name) = ident(j).filter(|n| !KEYWORDS.contains(n)) {
                    f.defs.push((here.clone(), name.to_string()));
                }
            }
            Tok::Ident(w)
                if matches!(w.as_str(), "crate" | "super" | "self")
                    && t.get(i + 1) == Some(&Tok::Sep)
                    && (i == 0 || !matches!(t[i - 1], Tok::Sep))
                    && (i == 0 || ident(i - 1) != Some("in")) =>
            {
                let mut path = vec![w.clone()];
                let mut j = i + 1;
                while t.get(j) == Some(&Tok::Sep) {
                    let Some(seg) = ident(j + 1) else { break };
                    path.push(seg.to_string());
                    j += 2;
                }
                f.paths.push((here.clone(), path));
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    f
}

/// `pub use`, `pub(crate) use`, `pub(in a::b) use`.
fn is_pub_before(t: &[Tok], use_at: usize) -> bool {
    let mut j = use_at - 1;
    if t[j] == Tok::Punct(')') {
        while j > 0 && t[j] != Tok::Punct('(') {
            j -= 1;
        }
        j = j.saturating_sub(1);
    }
    t[j] == Tok::Ident("pub".into())
}

/// One use tree from `t[*i]` on (`a::b::{c, d::*, e as f}`), each leaf a full path; stops
/// after the closing `;` of the statement (or at a `,`/`}` of the enclosing group).
fn use_tree(t: &[Tok], i: &mut usize, mut path: Vec<String>, out: &mut Vec<Import>) {
    loop {
        match t.get(*i) {
            Some(Tok::Sep) => *i += 1,
            Some(Tok::Ident(s)) if s != "as" => {
                path.push(s.clone());
                *i += 1;
            }
            Some(Tok::Punct('{')) => {
                *i += 1;
                while !matches!(t.get(*i), None | Some(Tok::Punct('}'))) {
                    use_tree(t, i, path.clone(), out);
                    if t.get(*i) == Some(&Tok::Punct(',')) {
                        *i += 1;
                    }
                }
                *i += 1;
                break;
            }
            Some(Tok::Punct('*')) => {
                *i += 1;
                out.push(Import { path, name: None });
                break;
            }
            _ => {
                if path.last().is_some_and(|s| s == "self") && path.len() > 1 {
                    path.pop(); // `a::{self}` is `a`
                }
                let mut name = path.last().cloned();
                if t.get(*i) == Some(&Tok::Ident("as".into())) {
                    name = match t.get(*i + 1) {
                        Some(Tok::Ident(a)) if a != "_" => Some(a.clone()),
                        _ => Some(String::new()), // `as _`: nameless
                    };
                    *i += 2;
                }
                if !path.is_empty() {
                    out.push(Import { path, name });
                }
                break;
            }
        }
    }
    if t.get(*i) == Some(&Tok::Punct(';')) {
        *i += 1;
    }
}
