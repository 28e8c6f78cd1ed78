use super::{
    parse::{tokens, Tok},
    *,
};

fn tree(files: &[(&str, &str)]) -> Analysis {
    let files: Vec<(String, String)> = files
        .iter()
        .map(|(p, s)| (p.to_string(), s.to_string()))
        .collect();
    analyze(&files)
}

/// Every edge as `from -> to: names`, paths without the `c/src/` prefix.
fn edges(a: &Analysis) -> Vec<String> {
    a.edges
        .iter()
        .map(|((f, t), names)| a.edge_line(*f, *t, names).replace("c/src/", ""))
        .collect()
}

#[test]
fn modules_come_from_the_place_of_the_file() {
    assert_eq!(module_of("c/src/lib.rs"), Some(("c".into(), vec![])));
    assert_eq!(module_of("c/src/main.rs"), Some(("c".into(), vec![])));
    assert_eq!(
        module_of("c/src/a/mod.rs"),
        Some(("c".into(), vec!["a".into()]))
    );
    assert_eq!(
        module_of("c/src/a/b.rs"),
        Some(("c".into(), vec!["a".into(), "b".into()]))
    );
}

#[test]
fn the_lexer_skips_comments_strings_chars_and_lifetimes() {
    let t = tokens(
        "/* crate::x /* nested */ */ // crate::y\n\"crate::z\" r#\"crate::w\"# 'c' '\\'' \
         &'static str b\"q\" crate::real",
    );
    let words: Vec<String> = t
        .iter()
        .filter_map(|t| match t {
            Tok::Ident(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(words, ["str", "crate", "real"]);
}

#[test]
fn use_groups_in_braces_resolve_to_the_defining_files() {
    let a = tree(&[
        ("c/src/lib.rs", "mod a;\nmod d;\nmod x;\n"),
        ("c/src/a/mod.rs", "pub mod b;\npub mod c;\n"),
        ("c/src/a/b.rs", "pub struct B;\n"),
        ("c/src/a/c.rs", "pub fn c() {}\n"),
        ("c/src/d.rs", "pub enum E { One }\n"),
        (
            "c/src/x.rs",
            "use crate::{a::{b::B, c}, d::E};\nfn f() { let _ = E::One; c::c(); }\n",
        ),
    ]);
    assert_eq!(
        edges(&a),
        ["x.rs -> a/b.rs: B", "x.rs -> a/c.rs: c", "x.rs -> d.rs: E"]
    );
}

#[test]
fn re_exports_are_followed_to_the_defining_file() {
    let a = tree(&[
        (
            "c/src/lib.rs",
            "mod p;\nmod user;\npub use p::s::Deep as Renamed;\n",
        ),
        (
            "c/src/p/mod.rs",
            "mod q;\nmod r;\nmod s;\npub use q::*;\npub use r::{R, R2};\npub use self::s::S;\n",
        ),
        ("c/src/p/q.rs", "pub struct Q;\npub const DEEP: u8 = 1;\n"),
        ("c/src/p/r.rs", "pub struct R;\npub struct R2;\n"),
        (
            "c/src/p/s.rs",
            "pub(crate) type S = u8;\npub struct Deep;\n",
        ),
        (
            "c/src/user.rs",
            "use crate::p::{Q, R};\nuse super::p::S;\n\
             fn f() -> u8 { crate::Renamed; crate::p::DEEP }\n",
        ),
    ]);
    assert_eq!(
        edges(&a),
        [
            "user.rs -> p/q.rs: DEEP, Q",
            "user.rs -> p/r.rs: R",
            "user.rs -> p/s.rs: Renamed, S",
        ]
    );
    assert!(a.cycles().is_empty());
}

#[test]
fn mod_declarations_self_edges_and_other_crates_are_no_edges() {
    let a = tree(&[
        ("c/src/lib.rs", "mod a;\nmod b;\npub struct Root;\n"),
        (
            "c/src/a.rs",
            "use std::fmt;\nuse anyhow::Context;\nuse self::inner::X;\nmod inner { pub struct X; }\n\
             #[cfg(test)]\nmod tests {\n    use super::*;\n    use crate::b::B;\n}\n",
        ),
        ("c/src/b.rs", "pub struct B;\nfn f() { let _ = crate::Root; }\n"),
    ]);
    // The test module inside a.rs belongs to a.rs.
    assert_eq!(edges(&a), ["a.rs -> b.rs: B", "b.rs -> lib.rs: Root"]);
}

#[test]
fn cycles_are_found_with_the_names_that_tie_them() {
    let a = tree(&[
        ("c/src/main.rs", "mod a;\nmod b;\nmod c;\nmod d;\n"),
        ("c/src/a.rs", "use crate::b::B;\npub struct A;\n"),
        (
            "c/src/b.rs",
            "pub struct B;\nfn f() { super::c::C::new(); }\n",
        ),
        (
            "c/src/c.rs",
            "pub struct C;\nfn g() -> crate::a::A { todo!() }\n",
        ),
        ("c/src/d.rs", "use crate::a::A;\n"),
    ]);
    let cycles = a.cycles();
    assert_eq!(cycles.len(), 1);
    let names: Vec<&str> = cycles[0].iter().map(|&f| a.files[f].0.as_str()).collect();
    assert_eq!(names, ["c/src/a.rs", "c/src/b.rs", "c/src/c.rs"]);
    let report = a.report(false);
    assert!(
        report.contains("  c/src/b.rs -> c/src/c.rs: C\n"),
        "{report}"
    );
    assert!(report.contains("1 cycle(s)"), "{report}");
}

#[test]
fn long_files_and_unreached_files_are_reported() {
    let long = "fn f() {}\n".repeat(MAX_LINES + 1);
    let a = tree(&[
        ("c/src/lib.rs", "mod big;\n"),
        ("c/src/big.rs", &long),
        ("c/src/stray.rs", ""),
    ]);
    assert_eq!(a.long_files().len(), 1);
    let report = a.report(false);
    assert!(
        report.contains("over 600 lines: c/src/big.rs (601 lines)"),
        "{report}"
    );
    assert!(
        report.contains("note: c/src/stray.rs is in no crate"),
        "{report}"
    );
    assert!(report.contains("max 601 lines (c/src/big.rs)"), "{report}");
}
