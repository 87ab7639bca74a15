output "remote_url" {
  description = "CLOUDCKPT_REMOTE for this run."
  value       = module.access.remote_url
}

output "training_role_arn" {
  description = "Role for the training job; annotate the EKS service account with it for IRSA."
  value       = module.access.training_role_arn
}

output "ci_role_arn" {
  description = "Role for the GitHub Actions restore step (null without github_oidc_provider_arn)."
  value       = module.access.ci_role_arn
}

output "launch_template_id" {
  description = "Spot launch template; use it in an Auto Scaling group or EC2 Fleet so a preempted instance is replaced."
  value       = aws_launch_template.spot_training.id
}
