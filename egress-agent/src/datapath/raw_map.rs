//! Taking one entry out of a hash map in one call (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`, Linux
//! 5.14), which aya 0.14 offers only for queues and stacks.

use std::{
    io,
    mem::MaybeUninit,
    os::fd::{AsFd, AsRawFd},
};

use aya::{
    maps::{HashMap, IterableMap, MapData},
    Pod,
};

use super::raw_link::{bpf, Attr};

const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// The value of `key` in `map`, removed from it. `ENOENT` when there is none.
pub fn take<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>, key: &K) -> io::Result<V> {
    let mut value = MaybeUninit::<V>::uninit();
    let fd = map.map().fd().as_fd().as_raw_fd();
    // map_elem: map_fd u32 (+ 4 bytes of padding), key u64, value u64, flags u64.
    let mut a = Attr { words: [0; 16] };
    a.words[0] = fd as u32 as u64;
    a.words[1] = std::ptr::from_ref(key) as u64;
    a.words[2] = value.as_mut_ptr() as u64;
    bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &a)?;
    // SAFETY: the kernel wrote a whole value (V is Pod: any bytes are a valid V).
    Ok(unsafe { value.assume_init() })
}
