//! Label values shared by the components' metrics, typed: a closed set is an enum, and every
//! label set is a struct (`EncodeLabelSet`), so a series cannot get a misspelled label.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};

/// Which way relayed bytes went (`direction`): upstream is client to destination.
#[allow(non_camel_case_types)] // the variant names are the label values
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Direction {
    upstream,
    downstream,
}

/// `{direction}`: bytes relayed by the proxy or the gateway.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

impl DirectionLabels {
    /// Both directions with the bytes that went each way, from (upstream, downstream).
    pub fn both(bytes: (u64, u64)) -> [(Self, u64); 2] {
        [
            (
                Self {
                    direction: Direction::upstream,
                },
                bytes.0,
            ),
            (
                Self {
                    direction: Direction::downstream,
                },
                bytes.1,
            ),
        ]
    }
}

/// A label value written as a fixed string per variant, for closed sets whose values are not
/// Rust identifiers (`gateway-error`, `http-connect`): `label_value!(Type)` implements
/// `EncodeLabelValue` through the type's `as_str`.
macro_rules! label_value {
    ($t:ty) => {
        impl prometheus_client::encoding::EncodeLabelValue for $t {
            fn encode(
                &self,
                encoder: &mut prometheus_client::encoding::LabelValueEncoder,
            ) -> std::fmt::Result {
                prometheus_client::encoding::EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    };
}
pub(crate) use label_value;
