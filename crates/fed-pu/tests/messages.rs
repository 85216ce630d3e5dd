//! Weight messages and FedAvg aggregation.

use candle_core::{Device, Tensor};
use fed_pu::message::{decode_metadata, decode_weights, encode_weights, encode_weights_with_metadata};
use fed_pu::strategy::weighted_average;
use fed_pu::Weights;
use std::collections::BTreeMap;

fn w(a: &[f32], b: f32) -> Weights {
    let mut m = Weights::new();
    m.insert("layer.weight".into(), Tensor::from_vec(a.to_vec(), (2, 2), &Device::Cpu).unwrap());
    m.insert("layer.bias".into(), Tensor::new(&[b], &Device::Cpu).unwrap());
    m
}

#[test]
fn safetensors_bytes_roundtrip_through_candle() {
    let a = w(&[1.0, -2.5, 3.25, 1e-7], 0.5);
    let bytes = encode_weights(&a).unwrap();
    assert_eq!(bytes, encode_weights(&a.clone()).unwrap(), "encoding is deterministic");
    let back = decode_weights(&bytes).unwrap();
    assert_eq!(back["layer.weight"].dims(), &[2, 2]);
    assert_eq!(
        back["layer.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![1.0, -2.5, 3.25, 1e-7]
    );
    assert_eq!(back["layer.bias"].to_vec1::<f32>().unwrap(), vec![0.5]);
    let mut meta = BTreeMap::new();
    meta.insert("round".to_string(), "7".to_string());
    let bytes = encode_weights_with_metadata(&a, &meta).unwrap();
    assert_eq!(decode_metadata(&bytes).unwrap()["round"], "7");
    assert_eq!(decode_weights(&bytes).unwrap().len(), 2);
    assert!(decode_weights(&bytes[..bytes.len() - 3]).is_err(), "truncated bytes are rejected");
}

#[test]
fn fedavg_is_the_example_weighted_mean() {
    // 1 x A + 3 x B (+ a client with 0 examples, ignored): (A + 3B) / 4
    let a = w(&[1.0, 2.0, 3.0, 4.0], 10.0);
    let b = w(&[5.0, 6.0, -7.0, 0.0], -2.0);
    let z = w(&[100.0, 100.0, 100.0, 100.0], 100.0);
    let avg = weighted_average(&[(1, a), (3, b), (0, z)]).unwrap();
    assert_eq!(
        avg["layer.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![4.0, 5.0, -4.5, 1.0]
    );
    assert_eq!(avg["layer.bias"].to_vec1::<f32>().unwrap(), vec![1.0]);
    assert!(weighted_average(&[(0, w(&[0.0; 4], 0.0))]).is_err());
    let mut bad = w(&[0.0; 4], 0.0);
    bad.remove("layer.bias");
    assert!(weighted_average(&[(1, w(&[0.0; 4], 0.0)), (1, bad)]).is_err());
}
