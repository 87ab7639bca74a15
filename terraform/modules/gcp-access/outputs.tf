output "training_service_account_email" {
  description = "Email of the training service account (attach it to spot VMs or bind it to a GKE service account)."
  value       = google_service_account.training.email
}

output "restore_service_account_email" {
  description = "Email of the read-only CI restore service account."
  value       = google_service_account.restore.email
}

output "training_condition" {
  description = "The IAM condition expression that limits the training service account to run_prefix."
  value       = local.training_condition
}

output "remote_url" {
  description = "The CLOUDCKPT_REMOTE value for the training job."
  value       = "gs://${var.bucket_name}/${var.run_prefix}"
}
