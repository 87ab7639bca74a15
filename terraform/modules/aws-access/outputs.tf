output "training_policy_arn" {
  description = "ARN of the policy the training job needs: read, write, list and delete under run_prefix."
  value       = aws_iam_policy.training.arn
}

output "restore_policy_arn" {
  description = "ARN of the read-only policy for a CI restore step (cloudckpt pull / ls / verify) under restore_prefix."
  value       = aws_iam_policy.restore.arn
}

output "training_role_arn" {
  description = "ARN of the role the training job assumes (EC2 instance profile and/or EKS IRSA)."
  value       = aws_iam_role.training.arn
}

output "training_role_name" {
  description = "Name of the training role."
  value       = aws_iam_role.training.name
}

output "instance_profile_name" {
  description = "Name of the EC2 instance profile for the training role, or null when ec2_instance_profile is false."
  value       = var.ec2_instance_profile ? aws_iam_instance_profile.training[0].name : null
}

output "ci_role_arn" {
  description = "ARN of the read-only CI restore role, or null when ci_oidc_provider_arn is not set."
  value       = var.ci_oidc_provider_arn == null ? null : aws_iam_role.ci_restore[0].arn
}

output "remote_url" {
  description = "The CLOUDCKPT_REMOTE value for the training job."
  value       = "s3://${local.bucket_name}/${var.run_prefix}"
}
