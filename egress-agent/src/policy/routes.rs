//! HTTP route rules: an Egress with `hosts` may list `http` routes (method, path, headers, as
//! OSM/FSM's HTTPRouteGroup matches). The proxy judges every HTTP/1.x request:
//! - a **deny** rule for the host whose routes match (or that has none) refuses it; deny wins;
//! - else an **allow** rule for the host whose routes match (or that has none) lets it out;
//! - else, when allow rules name the host but none of their routes matches, it is refused
//!   (the routes are the most specific word about this host: an address allow does not
//!   widen them);
//! - else the address rules and `enableEgress` decide, as for any host.
//!
//! Over TLS the proxy sees the SNI only, no request: an allow rule with routes does not allow
//! a TLS connection, and a deny rule with routes refuses the whole host.

use std::fmt;

use regex::{Regex, RegexBuilder};

use super::model::{EgressSpec, HttpRoute};
use egress_common::wire::http::Header;

/// What a route looks at in a request.
pub struct RequestView<'a> {
    pub host: Option<&'a str>,
    pub method: &'a str,
    /// Without the query string.
    pub path: &'a str,
    pub headers: &'a [Header<'a>],
}

/// The compiled routes of one rule (compared by their source).
#[derive(Clone, Default)]
pub struct Routes {
    src: Vec<HttpRoute>,
    routes: Vec<Route>,
}

#[derive(Clone)]
struct Route {
    methods: Vec<String>,
    paths: Vec<PathRule>,
    headers: Vec<(String, Regex)>,
}

#[derive(Clone)]
enum PathRule {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl PartialEq for Routes {
    fn eq(&self, o: &Self) -> bool {
        self.src == o.src
    }
}

impl fmt::Debug for Routes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.src.fmt(f)
    }
}

/// Longest compiled regex (bytes of the automaton) a route may hold.
const REGEX_SIZE: usize = 256 * 1024;

fn regex(field: &str, re: &str) -> Result<Regex, (String, String)> {
    RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(REGEX_SIZE)
        .build()
        .map_err(|e| {
            let first = e
                .to_string()
                .lines()
                .last()
                .unwrap_or("")
                .trim()
                .to_string();
            (field.to_string(), format!("bad regex {re:?}: {first}"))
        })
}

impl Routes {
    /// Compiles `http`; the error is (field, reason).
    pub fn compile(http: &[HttpRoute]) -> Result<Routes, (String, String)> {
        let mut routes = Vec::new();
        for (i, r) in http.iter().enumerate() {
            let f = format!("spec.http[{i}]");
            let mut methods = Vec::new();
            for m in &r.methods {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic() || b == b'*') {
                    return Err((format!("{f}.methods"), format!("{m:?} is not a method")));
                }
                methods.push(m.to_ascii_uppercase());
            }
            let mut paths = Vec::new();
            for (j, p) in r.paths.iter().enumerate() {
                let pf = format!("{f}.paths[{j}]");
                let rule = match (&p.exact, &p.prefix, &p.regex) {
                    (Some(e), None, None) if e.starts_with('/') => PathRule::Exact(e.clone()),
                    (None, Some(e), None) if e.starts_with('/') => PathRule::Prefix(e.clone()),
                    (None, None, Some(re)) => PathRule::Regex(regex(&pf, re)?),
                    (Some(_), None, None) | (None, Some(_), None) => {
                        return Err((pf, "a path starts with '/'".into()))
                    }
                    _ => return Err((pf, "give one of exact, prefix or regex".into())),
                };
                paths.push(rule);
            }
            let mut headers = Vec::new();
            for (name, re) in &r.headers {
                let hf = format!("{f}.headers.{name}");
                if name.is_empty()
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return Err((hf, format!("{name:?} is not a header name")));
                }
                headers.push((name.to_ascii_lowercase(), regex(&hf, re)?));
            }
            routes.push(Route {
                methods,
                paths,
                headers,
            });
        }
        Ok(Routes {
            src: http.to_vec(),
            routes,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Whether some route matches `r` (no routes: every request does).
    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        self.routes.is_empty() || self.routes.iter().any(|x| x.matches(r))
    }
}

impl Route {
    fn matches(&self, r: &RequestView<'_>) -> bool {
        let method = self.methods.is_empty()
            || self
                .methods
                .iter()
                .any(|m| m == "*" || m.eq_ignore_ascii_case(r.method));
        let path = self.paths.is_empty()
            || self.paths.iter().any(|p| match p {
                PathRule::Exact(e) => r.path == e,
                PathRule::Prefix(e) => r.path.starts_with(e.as_str()),
                PathRule::Regex(re) => re.is_match(r.path),
            });
        method
            && path
            && self.headers.iter().all(|(name, re)| {
                r.headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case(name))
                    .any(|h| std::str::from_utf8(h.value).is_ok_and(|v| re.is_match(v.trim())))
            })
    }
}

/// The checks of an Egress's `http`: (field, reason).
pub fn check(s: &EgressSpec) -> Result<(), (String, String)> {
    if s.http.is_empty() {
        return Ok(());
    }
    if s.hosts.is_empty() {
        return Err((
            "spec.http".into(),
            "routes judge requests for hosts: give hosts".into(),
        ));
    }
    Routes::compile(&s.http).map(|_| ())
}

#[cfg(test)]
mod tests;
