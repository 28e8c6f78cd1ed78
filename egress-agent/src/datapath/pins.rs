//! Where the datapath lives on bpffs: `<pin dir>/v<LAYOUT_VERSION>/{maps,links}`, the layout
//! check of maps pinned by an earlier run, and the removal of pins (older layouts, uninstall).

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{maps::MapData, EbpfLoader};
use egress_common::{names, LAYOUT_VERSION};

use super::error::{io, map_err, BpfError};

/// The versioned directory below a pin root.
pub fn versioned(pin_root: &Path) -> PathBuf {
    pin_root.join(format!("v{LAYOUT_VERSION}"))
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there.
pub(super) fn ensure_bpffs(pin_root: &Path) -> Result<(), BpfError> {
    if !pin_root.starts_with("/sys/fs/bpf") {
        return Ok(());
    }
    let mounts =
        fs::read_to_string("/proc/mounts").map_err(io(Path::new("/proc/mounts"), "read"))?;
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == "/sys/fs/bpf" && f[2] == "bpf"
    });
    if !mounted {
        nix::mount::mount(
            Some("bpf"),
            "/sys/fs/bpf",
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| BpfError::Io {
            path: "/sys/fs/bpf".into(),
            op: "mount bpffs",
            source: e.into(),
        })?;
    }
    Ok(())
}

pub(super) fn map_data(m: &aya::maps::Map) -> Option<&MapData> {
    use aya::maps::Map;
    match m {
        Map::Array(d) | Map::HashMap(d) | Map::LruHashMap(d) | Map::LpmTrie(d) => Some(d),
        Map::PerCpuArray(d) | Map::RingBuf(d) | Map::SkStorage(d) => Some(d),
        _ => None,
    }
}

/// Checks that the maps pinned in `maps_dir` have the layout this agent's object needs (type,
/// key and value size, capacity), by comparing with throw-away maps created from `object`.
pub(super) fn check_layout(maps_dir: &Path, object: &[u8]) -> Result<(), BpfError> {
    let fresh = EbpfLoader::new().load(object)?;
    for name in names::ALL {
        let want = fresh
            .map(name)
            .and_then(map_data)
            .ok_or(BpfError::Missing(name))?
            .info()
            .map_err(map_err(name))?;
        let have = aya::maps::MapInfo::from_pin(maps_dir.join(name)).map_err(map_err(name))?;
        let shape = |i: &aya::maps::MapInfo| {
            (
                i.map_type().ok(),
                i.key_size(),
                i.value_size(),
                i.max_entries(),
            )
        };
        if shape(&want) != shape(&have) {
            return Err(BpfError::Incompatible {
                map: name,
                dir: maps_dir.to_path_buf(),
                detail: format!("pinned {:?}, needed {:?}", shape(&have), shape(&want)),
            });
        }
    }
    Ok(())
}

/// Removes the pins of every layout version other than this one: their programs are
/// detached once the new ones are attached.
pub(super) fn retire_old_versions(pin_root: &Path) {
    let Ok(entries) = fs::read_dir(pin_root) else {
        return;
    };
    let current = format!("v{LAYOUT_VERSION}");
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('v') && name != current && name[1..].parse::<u32>().is_ok() {
            remove_version(&e.path());
            tracing::info!(pins = %e.path().display(), "retired the pins of an older layout");
        }
    }
}

/// Removes every pin under `pin_root`, of every layout version (links first: that detaches
/// the programs). `uninstall`.
pub fn remove_pins(pin_root: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    if let Ok(entries) = fs::read_dir(pin_root) {
        for e in entries.flatten() {
            removed.extend(remove_version(&e.path()));
        }
    }
    let _ = fs::remove_dir(pin_root);
    removed
}

fn remove_version(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for sub in ["links", "maps"] {
        let d = dir.join(sub);
        if let Ok(entries) = fs::read_dir(&d) {
            for e in entries.flatten() {
                if fs::remove_file(e.path()).is_ok() {
                    removed.push(e.path());
                }
            }
        }
        let _ = fs::remove_dir(&d);
    }
    let _ = fs::remove_dir(dir);
    removed
}
