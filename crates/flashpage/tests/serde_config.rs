//! The `serde` feature: configurations round-trip, and a deserialized head configuration is
//! validated like one built with `HeadConfig::new`.
#![cfg(feature = "serde")]

use flashpage::{
    AttentionOptions, DType, HeadConfig, PlanConfig, PosEncoding, WorkspaceLimits, workspace_size,
};

#[test]
fn configurations_round_trip() {
    let opts = AttentionOptions::new()
        .with_causal(true)
        .with_window_left(4095)
        .with_logits_soft_cap(50.0)
        .with_pos_encoding(PosEncoding::Rope {
            theta: 5e5,
            scale: 8.0,
        });
    let text = serde_json::to_string(&opts).unwrap();
    assert_eq!(
        serde_json::from_str::<AttentionOptions>(&text).unwrap(),
        opts
    );

    let mut config = PlanConfig::with_parallelism(528);
    config.graph_capacity = Some(256);
    let limits = WorkspaceLimits::new(
        HeadConfig::new(32, 8, 128).unwrap(),
        DType::BF16,
        256,
        8192,
        32768,
        528,
    )
    .with_config(config);
    let text = serde_json::to_string(&limits).unwrap();
    assert!(text.contains("\"bf16\""), "{text}");
    let back: WorkspaceLimits = serde_json::from_str(&text).unwrap();
    assert_eq!(back, limits);
    assert_eq!(
        workspace_size(&back).unwrap(),
        workspace_size(&limits).unwrap()
    );
}

#[test]
fn an_invalid_head_configuration_is_refused() {
    let e = serde_json::from_str::<HeadConfig>(
        r#"{"num_qo_heads": 32, "num_kv_heads": 5, "head_dim": 128}"#,
    )
    .unwrap_err();
    assert!(e.to_string().contains("multiple of num_kv_heads"), "{e}");
}
