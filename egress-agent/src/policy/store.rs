//! The agent's live policy: YAML documents keyed by (kind, namespace, name). It starts as the
//! policy file (or the state saved by the last run), `policy apply` upserts objects,
//! `policy delete` removes Egress objects, `egress enable|disable` edits the MeshConfig. Every
//! candidate goes through the same strict parser and compiler before it can take effect, and
//! is saved as the state file after it did.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::policy::{self, Config, ConfigError, ObjectRef};

/// (kind, namespace, name); cluster-scoped kinds have an empty namespace.
type DocKey = (String, String, String);

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Store {
    docs: BTreeMap<DocKey, serde_yaml::Value>,
}

impl Store {
    /// Parses `text` strictly (as a whole policy file) and keeps its documents.
    pub fn parse(text: &str, file: &str) -> Result<(Store, Config), ConfigError> {
        let cfg = policy::parse(text, file)?;
        Ok((Self::docs(text), cfg))
    }

    /// Reads the documents of a file to apply onto the live set. Only the YAML syntax and
    /// duplicates are checked here; [`Store::merge`] validates every object, and the whole,
    /// strictly, with errors naming `file`.
    pub fn parse_fragment(text: &str, file: &str) -> Result<Store, ConfigError> {
        let err = |object: String, field: &str, reason: String| ConfigError {
            file: file.to_string(),
            object,
            field: field.to_string(),
            reason,
        };
        let mut docs = BTreeMap::new();
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let v = serde_yaml::Value::deserialize(doc)
                .map_err(|e| err(format!("document {}", i + 1), "", e.to_string()))?;
            if v.is_null() {
                continue;
            }
            let k = key_of(&v);
            if docs.contains_key(&k) {
                let (kind, ns, name) = &k;
                let id = if ns.is_empty() {
                    name.clone()
                } else {
                    format!("{ns}/{name}")
                };
                return Err(err(
                    format!("{kind} {id}"),
                    "metadata.name",
                    format!("duplicate {kind} {id}"),
                ));
            }
            docs.insert(k, v);
        }
        Ok(Store { docs })
    }

    fn docs(text: &str) -> Store {
        // Only called on text policy::parse accepted.
        Self::parse_fragment(text, "").unwrap_or_default()
    }

    pub fn load(path: &Path) -> Result<(Store, Config), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            object: "file".into(),
            field: String::new(),
            reason: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The store with `other`'s objects added or replacing those of the same kind and name,
    /// validated as a whole (`file` names the applied file in errors).
    pub fn merge(&self, other: &Store, file: &str) -> Result<(Store, Config), ConfigError> {
        let mut docs = self.docs.clone();
        docs.extend(other.docs.iter().map(|(k, v)| (k.clone(), v.clone())));
        let merged = Store { docs };
        let cfg = policy::parse(&merged.to_text(), file)?;
        Ok((merged, cfg))
    }

    /// The store without Egress `id`; None when there is no such Egress.
    pub fn without_egress(&self, id: &ObjectRef) -> Option<Result<(Store, Config), ConfigError>> {
        let key = ("Egress".to_string(), id.namespace.clone(), id.name.clone());
        let mut docs = self.docs.clone();
        docs.remove(&key)?;
        let s = Store { docs };
        Some(policy::parse(&s.to_text(), "live policy").map(|c| (s, c)))
    }

    /// The store with MeshConfig's `spec.traffic.enableEgress` set.
    pub fn with_enable_egress(&self, enable: bool) -> Result<(Store, Config), ConfigError> {
        use serde_yaml::{Mapping, Value};
        let mut docs = self.docs.clone();
        let key = docs
            .keys()
            .find(|k| k.0 == "MeshConfig")
            .cloned()
            .unwrap_or_else(|| ("MeshConfig".into(), String::new(), "egress".into()));
        let doc = docs.entry(key).or_insert_with(|| {
            serde_yaml::from_str("kind: MeshConfig\nmetadata: {name: egress}\nspec: {}\n")
                .unwrap_or(Value::Null)
        });
        let mut cursor = doc;
        for field in ["spec", "traffic"] {
            let Value::Mapping(m) = cursor else { break };
            cursor = m
                .entry(Value::from(field))
                .or_insert_with(|| Value::Mapping(Mapping::new()));
            if cursor.is_null() {
                *cursor = Value::Mapping(Mapping::new());
            }
        }
        if let Value::Mapping(m) = cursor {
            m.insert(Value::from("enableEgress"), Value::from(enable));
        }
        let s = Store { docs };
        let cfg = policy::parse(&s.to_text(), "live policy")?;
        Ok((s, cfg))
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for v in self.docs.values() {
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(v).unwrap_or_default());
        }
        out
    }

    /// Writes the store to `path` atomically (temp file, fsync, rename).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write as _;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp: PathBuf = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(b"# egress-agent live policy: written after every change; do not edit while the agent runs\n")?;
        f.write_all(self.to_text().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

fn key_of(v: &serde_yaml::Value) -> DocKey {
    let s = |x: Option<&serde_yaml::Value>| x.and_then(|v| v.as_str()).unwrap_or("").to_string();
    let kind = s(v.get("kind"));
    let meta = v.get("metadata");
    let name = s(meta.and_then(|m| m.get("name")));
    let ns = match kind.as_str() {
        "MeshConfig" | "EgressGateway" => String::new(),
        _ => {
            let ns = s(meta.and_then(|m| m.get("namespace")));
            if ns.is_empty() {
                "default".into()
            } else {
                ns
            }
        }
    };
    (kind, ns, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "kind: MeshConfig\nmetadata: {name: m}\nspec: {traffic: {enableEgress: false}}\n---\nkind: Workload\nmetadata: {name: web}\n---\nkind: Egress\nmetadata: {name: a}\nspec: {sources: [{name: web}], ipAddresses: [127.1.0.0/16]}\n";

    #[test]
    fn merge_upserts_by_kind_and_name() {
        let (s, _) = Store::parse(BASE, "base.yaml").unwrap();
        let add = Store::parse_fragment(
            "kind: Egress\nmetadata: {name: a, namespace: default}\nspec: {sources: [{name: web}], ipAddresses: [127.2.0.0/16]}\n---\nkind: Egress\nmetadata: {name: b}\nspec: {sources: [{name: web}], action: deny}\n",
            "new.yaml",
        )
        .unwrap();
        let (m, cfg) = s.merge(&add, "new.yaml").unwrap();
        assert_eq!(cfg.egresses.len(), 2);
        let a = cfg.egresses.iter().find(|e| e.id.name == "a").unwrap();
        assert_eq!(a.spec.ip_addresses[0].to_string(), "127.2.0.0/16");
        // Round-trips through its own text.
        let (again, _) = Store::parse(&m.to_text(), "state").unwrap();
        assert_eq!(again, m);
    }

    #[test]
    fn cross_object_errors_name_the_applied_file() {
        let (s, _) = Store::parse(BASE, "base.yaml").unwrap();
        let add = Store::parse_fragment("kind: Workload\nmetadata: {name: db}\n---\nkind: Egress\nmetadata: {name: c}\nspec: {sources: [{name: db}]}\n", "x.yaml").unwrap();
        assert!(s.merge(&add, "x.yaml").is_ok());
        let bad = Store::parse_fragment(
            "kind: Egress\nmetadata: {name: c}\nspec: {sources: [{name: nope}]}\n",
            "y.yaml",
        )
        .unwrap();
        let e = s.merge(&bad, "y.yaml").unwrap_err().to_string();
        assert!(
            e.starts_with("y.yaml: Egress default/c: spec.sources[0].name"),
            "{e}"
        );
    }

    #[test]
    fn delete_and_toggle() {
        let (s, _) = Store::parse(BASE, "base.yaml").unwrap();
        let id = ObjectRef {
            namespace: "default".into(),
            name: "a".into(),
        };
        let (s2, cfg) = s.without_egress(&id).unwrap().unwrap();
        assert!(cfg.egresses.is_empty());
        assert!(s2.without_egress(&id).is_none());
        let (s3, cfg) = s2.with_enable_egress(true).unwrap();
        assert!(cfg.mesh.traffic.enable_egress);
        let (_, cfg) = s3.with_enable_egress(false).unwrap();
        assert!(!cfg.mesh.traffic.enable_egress);
        // Without any MeshConfig, one is created.
        let (bare, _) = Store::parse("kind: Workload\nmetadata: {name: web}\n", "b").unwrap();
        let (_, cfg) = bare.with_enable_egress(false).unwrap();
        assert!(!cfg.mesh.traffic.enable_egress);
    }
}
