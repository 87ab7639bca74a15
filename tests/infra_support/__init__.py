"""Helpers for the infrastructure tests (terraform/, infra/): HCL loading, an S3 request recorder, IAM matching."""
