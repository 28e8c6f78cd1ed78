//! What can go wrong with the eBPF object, its maps, programs, links and pins.

use std::path::{Path, PathBuf};

use aya::{maps::MapError, programs::ProgramError, EbpfError};

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("program {name}: link: {source}")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("map {map}: the pins in {dir} have another layout ({detail}): remove them with `egress-agent uninstall` (enforcement stops) or use another --pin-dir")]
    Incompatible {
        map: &'static str,
        dir: PathBuf,
        detail: String,
    },
}

pub(super) fn io<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> BpfError + 'a {
    move |source| BpfError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

pub(super) fn map_err(name: &'static str) -> impl FnOnce(MapError) -> BpfError {
    move |source| BpfError::Map { name, source }
}
