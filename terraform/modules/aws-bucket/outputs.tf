output "bucket_name" {
  description = "Name of the checkpoint bucket."
  value       = aws_s3_bucket.this.id
}

output "bucket_arn" {
  description = "ARN of the checkpoint bucket, for IAM policies (see the aws-access module)."
  value       = aws_s3_bucket.this.arn
}

output "kms_key_arn" {
  description = "The KMS key used for SSE-KMS, or null when the bucket uses SSE-S3."
  value       = var.kms_key_arn
}
