//! Kubernetes label selectors in full: `matchLabels` and `matchExpressions` (`In`, `NotIn`,
//! `Exists`, `DoesNotExist`), as Egress sources, NetworkPolicy `podSelector`s and
//! `namespaceSelector`s use them. An empty selector selects everything.

use std::collections::BTreeMap;

use serde::Deserialize;

pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: Labels,
    #[serde(default)]
    pub match_expressions: Vec<Requirement>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    #[serde(default)]
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// Whether `labels` satisfy every label and every expression.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    /// The Kubernetes rules: `In` and `NotIn` need values, `Exists` and `DoesNotExist` none.
    /// Err: (field under the selector, reason).
    pub fn check(&self) -> Result<(), (String, String)> {
        for (i, r) in self.match_expressions.iter().enumerate() {
            let f = format!("matchExpressions[{i}].values");
            let with_values = matches!(r.operator, Operator::In | Operator::NotIn);
            if r.key.is_empty() {
                return Err((format!("matchExpressions[{i}].key"), "empty".into()));
            }
            if with_values && r.values.is_empty() {
                return Err((f, format!("{:?} needs at least one value", r.operator)));
            }
            if !with_values && !r.values.is_empty() {
                return Err((f, format!("{:?} takes no values", r.operator)));
            }
        }
        Ok(())
    }
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let v = labels.get(&self.key);
        match self.operator {
            Operator::In => v.is_some_and(|v| self.values.contains(v)),
            // As in Kubernetes: a missing label is not in the set.
            Operator::NotIn => v.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => v.is_some(),
            Operator::DoesNotExist => v.is_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(yaml: &str) -> LabelSelector {
        let v: serde_json::Value = serde_saphyr::from_str(yaml).unwrap();
        serde_json::from_value(v).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn expressions_as_kubernetes_defines_them() {
        let web = labels(&[("app", "web"), ("tier", "front")]);
        let db = labels(&[("app", "db")]);
        let none = Labels::new();
        let cases = [
            ("{}", [true, true, true]),
            ("{matchLabels: {app: web}}", [true, false, false]),
            (
                "{matchExpressions: [{key: app, operator: In, values: [web, db]}]}",
                [true, true, false],
            ),
            (
                "{matchExpressions: [{key: app, operator: NotIn, values: [web]}]}",
                [false, true, true],
            ),
            (
                "{matchExpressions: [{key: tier, operator: Exists}]}",
                [true, false, false],
            ),
            (
                "{matchExpressions: [{key: tier, operator: DoesNotExist}]}",
                [false, true, true],
            ),
            (
                "{matchLabels: {app: db}, matchExpressions: [{key: tier, operator: DoesNotExist}]}",
                [false, true, false],
            ),
        ];
        for (y, want) in cases {
            let s = sel(y);
            assert_eq!(s.check(), Ok(()), "{y}");
            let got = [s.matches(&web), s.matches(&db), s.matches(&none)];
            assert_eq!(got, want, "{y}");
        }
        let e = sel("{matchExpressions: [{key: a, operator: In}]}").check();
        assert_eq!(
            e,
            Err((
                "matchExpressions[0].values".into(),
                "In needs at least one value".into()
            ))
        );
        let e = sel("{matchExpressions: [{key: a, operator: Exists, values: [x]}]}").check();
        assert!(e.is_err());
    }
}
