//! Where the kubelet puts a pod's cgroup (cgroup v2), as pure functions of the pod.
//!
//! The kubelet makes one cgroup per pod below the kubepods cgroup (the agent's `--cgroup-root`
//! in Kubernetes mode), under a QoS-class level, and the container runtime puts each container
//! in a cgroup below the pod's:
//!
//! | driver   | pod (Burstable; BestEffort alike)                      | Guaranteed                     |
//! |----------|--------------------------------------------------------|--------------------------------|
//! | systemd  | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice` | `kubepods.slice/kubepods-pod<uid_>.slice` |
//! | cgroupfs | `kubepods/burstable/pod<uid>`                           | `kubepods/pod<uid>`            |
//!
//! (`<uid_>` is the pod UID with `-` replaced by `_`, as systemd unit names need.) Containers:
//! systemd driver `cri-containerd-<id>.scope` (containerd) or `crio-<id>.scope` (CRI-O);
//! cgroupfs driver `<id>` for both. The pod's cgroup is the workload: the programs walk a
//! socket's cgroup ancestors, so every container of the pod (restarted ones too) is covered
//! without tracking container ids.

use std::path::{Path, PathBuf};

/// The kubelet's cgroup driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

impl Driver {
    /// The driver whose layout the kubepods cgroup `root` has: a `.slice` is systemd's.
    pub fn of_root(root: &Path) -> Driver {
        match root.file_name().and_then(|n| n.to_str()) {
            Some(n) if n.ends_with(".slice") => Driver::Systemd,
            _ => Driver::Cgroupfs,
        }
    }
}

/// A pod's QoS class (`status.qosClass`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    /// `status.qosClass`; None for an unknown or missing class.
    pub fn parse(s: &str) -> Option<Qos> {
        match s {
            "Guaranteed" => Some(Qos::Guaranteed),
            "Burstable" => Some(Qos::Burstable),
            "BestEffort" => Some(Qos::BestEffort),
            _ => None,
        }
    }

    fn level(self) -> Option<&'static str> {
        match self {
            Qos::Guaranteed => None,
            Qos::Burstable => Some("burstable"),
            Qos::BestEffort => Some("besteffort"),
        }
    }
}

/// The pod's cgroup, relative to the kubepods cgroup.
pub fn pod_dir(driver: Driver, qos: Qos, uid: &str) -> PathBuf {
    match (driver, qos.level()) {
        (Driver::Systemd, None) => PathBuf::from(format!("kubepods-pod{}.slice", escape(uid))),
        (Driver::Systemd, Some(l)) => PathBuf::from(format!("kubepods-{l}.slice"))
            .join(format!("kubepods-{l}-pod{}.slice", escape(uid))),
        (Driver::Cgroupfs, None) => PathBuf::from(format!("pod{uid}")),
        (Driver::Cgroupfs, Some(l)) => PathBuf::from(l).join(format!("pod{uid}")),
    }
}

/// A container's cgroup relative to its pod's, from `status.containerStatuses[].containerID`
/// (`containerd://<id>`, `cri-o://<id>`); None for another runtime or a malformed id.
pub fn container_dir(driver: Driver, container_id: &str) -> Option<PathBuf> {
    let (runtime, id) = container_id.split_once("://")?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let name = match (driver, runtime) {
        (Driver::Systemd, "containerd") => format!("cri-containerd-{id}.scope"),
        (Driver::Systemd, "cri-o") => format!("crio-{id}.scope"),
        (Driver::Cgroupfs, "containerd" | "cri-o") => id.to_string(),
        _ => return None,
    };
    Some(PathBuf::from(name))
}

/// A pod UID in a systemd unit name: `-` is systemd's path separator, so the kubelet writes `_`.
fn escape(uid: &str) -> String {
    uid.replace('-', "_")
}

/// The pod's cgroup under `root`, when the kubelet made it: the one of `qos` if it exists,
/// else the other QoS levels (a stale or missing `qosClass` must not lose a pod).
pub fn find_pod(root: &Path, qos: Option<Qos>, uid: &str) -> Option<PathBuf> {
    let driver = Driver::of_root(root);
    let order = [Qos::Burstable, Qos::BestEffort, Qos::Guaranteed];
    qos.into_iter()
        .chain(order.into_iter().filter(|q| Some(*q) != qos))
        .map(|q| root.join(pod_dir(driver, q, uid)))
        .find(|d| d.join("cgroup.procs").exists())
}

/// The network namespace of the pod whose cgroup is `dir`: `/proc/<pid>/ns/net` of the first
/// process found in it or below (the sandbox's pause process is usually the first).
pub fn pod_netns(dir: &Path) -> Option<PathBuf> {
    let first = std::fs::read_to_string(dir.join("cgroup.procs"))
        .ok()
        .and_then(|t| t.lines().next().map(str::to_string));
    if let Some(pid) = first {
        return Some(PathBuf::from(format!("/proc/{pid}/ns/net")));
    }
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .find_map(|e| pod_netns(&e.path()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6f1c2b3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c";

    #[test]
    fn systemd_layout() {
        let d = Driver::of_root(Path::new("/sys/fs/cgroup/kubepods.slice"));
        assert_eq!(d, Driver::Systemd);
        assert_eq!(
            pod_dir(d, Qos::Burstable, UID),
            Path::new("kubepods-burstable.slice/kubepods-burstable-pod6f1c2b3a_0d4e_4f5a_8b6c_7d8e9f0a1b2c.slice")
        );
        assert_eq!(
            pod_dir(d, Qos::BestEffort, UID),
            Path::new("kubepods-besteffort.slice/kubepods-besteffort-pod6f1c2b3a_0d4e_4f5a_8b6c_7d8e9f0a1b2c.slice")
        );
        assert_eq!(
            pod_dir(d, Qos::Guaranteed, UID),
            Path::new("kubepods-pod6f1c2b3a_0d4e_4f5a_8b6c_7d8e9f0a1b2c.slice")
        );
        assert_eq!(
            container_dir(d, "containerd://0123abcd").unwrap(),
            Path::new("cri-containerd-0123abcd.scope")
        );
        assert_eq!(
            container_dir(d, "cri-o://0123abcd").unwrap(),
            Path::new("crio-0123abcd.scope")
        );
    }

    #[test]
    fn cgroupfs_layout() {
        let d = Driver::of_root(Path::new("/sys/fs/cgroup/kubepods"));
        assert_eq!(d, Driver::Cgroupfs);
        assert_eq!(
            pod_dir(d, Qos::Burstable, UID),
            Path::new(&format!("burstable/pod{UID}"))
        );
        assert_eq!(
            pod_dir(d, Qos::BestEffort, UID),
            Path::new(&format!("besteffort/pod{UID}"))
        );
        assert_eq!(
            pod_dir(d, Qos::Guaranteed, UID),
            Path::new(&format!("pod{UID}"))
        );
        assert_eq!(
            container_dir(d, "containerd://0123abcd").unwrap(),
            Path::new("0123abcd")
        );
        assert_eq!(
            container_dir(d, "cri-o://0123abcd").unwrap(),
            Path::new("0123abcd")
        );
    }

    #[test]
    fn odd_container_ids_are_refused() {
        let d = Driver::Systemd;
        assert!(container_dir(d, "docker://0123").is_none());
        assert!(container_dir(d, "containerd://../../x").is_none());
        assert!(container_dir(d, "containerd://").is_none());
        assert!(container_dir(d, "0123").is_none());
        assert_eq!(Qos::parse("Burstable"), Some(Qos::Burstable));
        assert_eq!(Qos::parse("burstable"), None);
    }

    #[test]
    fn find_pod_falls_back_to_the_other_qos_levels() {
        // A plain directory tree stands in for cgroupfs here: only `cgroup.procs` is looked at.
        let root = std::env::temp_dir().join(format!("egress-k8s-unit-{}", std::process::id()));
        let sys = root.join("kubepods.slice");
        let pod = sys.join(pod_dir(Driver::Systemd, Qos::BestEffort, UID));
        std::fs::create_dir_all(pod.join("cri-containerd-ab.scope")).unwrap();
        std::fs::write(pod.join("cri-containerd-ab.scope/cgroup.procs"), "4242\n").unwrap();
        std::fs::write(pod.join("cgroup.procs"), "").unwrap();
        assert_eq!(
            find_pod(&sys, Some(Qos::BestEffort), UID),
            Some(pod.clone())
        );
        assert_eq!(find_pod(&sys, Some(Qos::Burstable), UID), Some(pod.clone()));
        assert_eq!(find_pod(&sys, None, UID), Some(pod.clone()));
        assert_eq!(find_pod(&sys, None, "other"), None);
        assert_eq!(pod_netns(&pod), Some(PathBuf::from("/proc/4242/ns/net")));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
