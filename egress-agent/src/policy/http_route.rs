//! The document shape of an Egress's HTTP routes (`spec.http`); matched in [`super::routes`].

use std::collections::BTreeMap;

use serde::Deserialize;

/// One HTTP route of an Egress (OSM/FSM HTTPRouteGroup matches, inline): a request matches
/// when its method is one of `methods`, its path matches one of `paths`, and every header of
/// `headers` matches its regex (each list empty: anything).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRoute {
    #[serde(default)]
    pub paths: Vec<PathMatch>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// A path: `exact`, `prefix` (on `/` boundaries or not, as written) or a whole-path `regex`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}
