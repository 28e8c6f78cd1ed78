//! The agent's live policy: documents keyed by (kind, namespace, name). It starts as the
//! policy file (or the state saved by the last run), `policy apply` upserts objects,
//! `policy delete` removes Egress objects, `egress enable|disable` edits the MeshConfig. Every
//! candidate goes through the same strict parser and compiler before it can take effect, and
//! is saved as the state file after it did.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde_json::{json, Map, Value};

use super::{
    document::{documents, to_yaml, DocKey, Document},
    error::ConfigError,
    model::{Config, ObjectRef},
    parse,
};

/// Cloning is cheap (the documents are shared, copied only when one is changed): the state
/// file's writer gets a snapshot of every change.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Store {
    docs: BTreeMap<DocKey, Arc<Value>>,
}

impl Store {
    /// Parses `text` strictly (as a whole policy file) and keeps its documents.
    pub fn parse(text: &str, file: &str) -> Result<(Store, Config), ConfigError> {
        let docs = documents(text, file)?;
        let cfg = parse::objects(&docs, file)?.finish()?;
        // A valid policy has no two objects of a kind and name.
        let store = Self::from_documents(docs, file)?;
        Ok((store, cfg))
    }

    /// Reads the documents of a file to apply onto the live set. Only the YAML syntax and
    /// duplicates are checked here; [`Store::merge`] validates every object, and the whole,
    /// strictly, with errors naming `file`.
    pub fn parse_fragment(text: &str, file: &str) -> Result<Store, ConfigError> {
        Self::from_documents(documents(text, file)?, file)
    }

    /// A store of `docs`; two of the same kind and name are an error naming `file`.
    pub fn from_documents(
        docs: impl IntoIterator<Item = Document>,
        file: &str,
    ) -> Result<Store, ConfigError> {
        let mut out = BTreeMap::new();
        for d in docs {
            let k = d.key();
            if out.contains_key(&k) {
                let (kind, ns, name) = &k;
                let id = if ns.is_empty() {
                    name.clone()
                } else {
                    format!("{ns}/{name}")
                };
                return Err(ConfigError::new(
                    file,
                    &format!("{kind} {id}"),
                    "metadata.name",
                    format!("duplicate {kind} {id}"),
                ));
            }
            out.insert(k, Arc::new(d.body));
        }
        Ok(Store { docs: out })
    }

    pub fn load(path: &Path) -> Result<(Store, Config), ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::unreadable(&file, &e))?;
        Self::parse(&text, &file)
    }

    /// The whole policy these documents make, strictly (`file` names it in errors).
    fn config(&self, file: &str) -> Result<Config, ConfigError> {
        let docs = Document::from_values(self.docs.values().map(|v| (**v).clone()), file)?;
        parse::objects(&docs, file)?.finish()
    }

    /// The store with `other`'s objects added or replacing those of the same kind and name,
    /// validated as a whole (`file` names the applied file in errors).
    pub fn merge(&self, other: &Store, file: &str) -> Result<(Store, Config), ConfigError> {
        let mut docs = self.docs.clone();
        docs.extend(other.docs.iter().map(|(k, v)| (k.clone(), v.clone())));
        let merged = Store { docs };
        let cfg = merged.config(file)?;
        Ok((merged, cfg))
    }

    /// The store without Egress `id`; None when there is no such Egress.
    pub fn without_egress(&self, id: &ObjectRef) -> Option<Result<(Store, Config), ConfigError>> {
        let key = ("Egress".to_string(), id.namespace.clone(), id.name.clone());
        let mut docs = self.docs.clone();
        docs.remove(&key)?;
        let s = Store { docs };
        Some(s.config("live policy").map(|c| (s, c)))
    }

    /// Sets MeshConfig's `spec.traffic.enableEgress` in place (a MeshConfig is added when
    /// there is none), without parsing anything again: a boolean cannot make a valid policy
    /// invalid. Only the MeshConfig document is copied, if a snapshot still shares it.
    pub fn set_enable_egress(&mut self, enable: bool) {
        let key = self
            .docs
            .keys()
            .find(|k| k.0 == "MeshConfig")
            .cloned()
            .unwrap_or_else(|| ("MeshConfig".into(), String::new(), "egress".into()));
        let doc = self.docs.entry(key).or_insert_with(|| {
            Arc::new(json!({"kind": "MeshConfig", "metadata": {"name": "egress"}, "spec": {}}))
        });
        let mut cursor = Arc::make_mut(doc);
        for field in ["spec", "traffic"] {
            let Value::Object(m) = cursor else { break };
            cursor = m.entry(field).or_insert_with(|| Value::Object(Map::new()));
            if cursor.is_null() {
                *cursor = Value::Object(Map::new());
            }
        }
        if let Value::Object(m) = cursor {
            m.insert("enableEgress".into(), Value::from(enable));
        }
    }

    /// The policy a candidate file (`other`, from `file`) would make, for `policy preview`:
    /// `other` merged into this store, or with `replace` instead of it. `kubernetes`: the
    /// objects are CRD objects (a source may name a pod this node does not run), and the
    /// node's pods (this store's Workloads) stay even with `replace`.
    pub fn candidate(
        &self,
        other: &Store,
        file: &str,
        replace: bool,
        kubernetes: bool,
    ) -> Result<Config, ConfigError> {
        let mut docs: BTreeMap<DocKey, Arc<Value>> = match (replace, kubernetes) {
            (false, _) => self.docs.clone(),
            (true, false) => BTreeMap::new(),
            (true, true) => self
                .docs
                .iter()
                .filter(|(k, _)| k.0 == "Workload")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        docs.extend(other.docs.iter().map(|(k, v)| (k.clone(), v.clone())));
        let docs = Document::from_values(docs.into_values().map(Arc::unwrap_or_clone), file)?;
        let objects = parse::objects(&docs, file)?;
        if kubernetes {
            objects.finish_unlinked()
        } else {
            objects.finish()
        }
    }

    pub fn to_text(&self) -> String {
        to_yaml(self.docs.values().map(|v| &**v))
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
    fn candidates_merge_or_replace_and_kubernetes_keeps_the_pods() {
        let (s, _) = Store::parse(BASE, "base.yaml").unwrap();
        let crd = "apiVersion: policy.egress.dev/v1alpha1\nkind: Egress\nmetadata: {name: b, namespace: default}\nspec: {sources: [{podSelector: {matchLabels: {app: api}}}], action: deny}\n";
        let add = Store::parse_fragment(crd, "c.yaml").unwrap();
        let merged = s.candidate(&add, "c.yaml", false, true).unwrap();
        assert_eq!((merged.egresses.len(), merged.workloads.len()), (2, 1));
        let replaced = s.candidate(&add, "c.yaml", true, true).unwrap();
        assert_eq!((replaced.egresses.len(), replaced.workloads.len()), (1, 1));
        // A standalone replace is the file alone, strictly: a source naming no workload fails.
        let named = Store::parse_fragment(
            "kind: Egress\nmetadata: {name: c}\nspec: {sources: [{name: web}]}\n",
            "d.yaml",
        )
        .unwrap();
        let e = s
            .candidate(&named, "d.yaml", true, false)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("d.yaml: Egress default/c"), "{e}");
        assert!(s.candidate(&named, "d.yaml", false, true).is_ok());
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
        let mut s3 = s2.clone();
        s3.set_enable_egress(true);
        assert!(s3.config("t").unwrap().mesh.traffic.enable_egress);
        // In place: the snapshot taken before keeps the old value.
        assert!(!s2.config("t").unwrap().mesh.traffic.enable_egress);
        s3.set_enable_egress(false);
        assert!(!s3.config("t").unwrap().mesh.traffic.enable_egress);
        // Round-trips through its own text (the state file).
        let (again, _) = Store::parse(&s3.to_text(), "state").unwrap();
        assert_eq!(again, s3);
        // Without any MeshConfig, one is created.
        let (mut bare, _) = Store::parse("kind: Workload\nmetadata: {name: web}\n", "b").unwrap();
        bare.set_enable_egress(false);
        assert!(!bare.config("b").unwrap().mesh.traffic.enable_egress);
    }
}
