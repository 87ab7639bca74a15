# Least-privilege access to one cloudckpt run prefix.
#
# The S3 actions below are exactly the ones cloudckpt's S3 backend sends (tests/test_iam_actions.py records them
# against a real S3 server and compares them with these statements):
#   training: push (PutObject incl. multipart parts/complete, HeadObject = GetObject), conditional index writes
#             (PutObject with If-Match / If-None-Match), pull/verify (GetObject), prune/gc (DeleteObjects =
#             DeleteObject, ListObjectsV2 = ListBucket), failed multipart uploads (AbortMultipartUpload);
#   restore:  pull / ls / verify read the index, manifests and files (GetObject) and never write; when a read gets
#             403 (S3's answer for a missing key to a caller without s3:ListBucket) they list exactly that key
#             (ListObjectsV2 = ListBucket, prefix-scoped) to tell a missing object from a forbidden one.
# No s3:DeleteObjectVersion is granted: with versioning on, a prune or gc leaves noncurrent versions that only the
# bucket's lifecycle rule removes, so a compromised training job cannot destroy history.

locals {
  bucket_name    = element(split(":::", var.bucket_arn), 1)
  restore_prefix = coalesce(var.restore_prefix, var.run_prefix)
  eks_issuer     = var.eks_oidc_provider_arn == null ? "" : element(split("oidc-provider/", var.eks_oidc_provider_arn), 1)
  ci_issuer      = var.ci_oidc_provider_arn == null ? "" : element(split("oidc-provider/", var.ci_oidc_provider_arn), 1)
}

data "aws_iam_policy_document" "training" {
  statement {
    sid       = "ListRunPrefix"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [var.bucket_arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.run_prefix}/*"]
    }
  }

  statement {
    sid     = "ReadWriteRunObjects"
    effect  = "Allow"
    actions = ["s3:AbortMultipartUpload", "s3:DeleteObject", "s3:GetObject", "s3:PutObject"]
    resources = [
      "${var.bucket_arn}/${var.run_prefix}/*",
    ]
  }

  dynamic "statement" {
    for_each = var.kms_key_arn == null ? [] : [var.kms_key_arn]
    content {
      sid       = "UseBucketKey"
      effect    = "Allow"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [statement.value]
    }
  }
}

data "aws_iam_policy_document" "restore" {
  # S3 answers a GET of a missing key with 403 instead of 404 to a caller that may not list: without this, a pull on
  # an empty run (exit 3 expected) or of a checkpoint pruned while it downloads (re-resolved) looks like denied access.
  statement {
    sid       = "ListRunPrefix"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [var.bucket_arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${local.restore_prefix}/*"]
    }
  }

  statement {
    sid     = "ReadRunObjects"
    effect  = "Allow"
    actions = ["s3:GetObject"]
    resources = [
      "${var.bucket_arn}/${local.restore_prefix}/*",
    ]
  }

  dynamic "statement" {
    for_each = var.kms_key_arn == null ? [] : [var.kms_key_arn]
    content {
      sid       = "DecryptWithBucketKey"
      effect    = "Allow"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]
    }
  }
}

resource "aws_iam_policy" "training" {
  name        = "${var.name}-training"
  description = "cloudckpt training job: read/write/list/delete under s3://${local.bucket_name}/${var.run_prefix}/"
  policy      = data.aws_iam_policy_document.training.json
  tags        = var.tags
}

resource "aws_iam_policy" "restore" {
  name        = "${var.name}-restore"
  description = "cloudckpt CI restore: read/list-only under s3://${local.bucket_name}/${local.restore_prefix}/"
  policy      = data.aws_iam_policy_document.restore.json
  tags        = var.tags
}

# --- the training role: EC2 instance profile and/or EKS service accounts (IRSA) ---------------------------------

data "aws_iam_policy_document" "training_trust" {
  dynamic "statement" {
    for_each = var.ec2_instance_profile ? [1] : []
    content {
      sid     = "Ec2InstanceProfile"
      effect  = "Allow"
      actions = ["sts:AssumeRole"]
      principals {
        type        = "Service"
        identifiers = ["ec2.amazonaws.com"]
      }
    }
  }

  dynamic "statement" {
    for_each = var.eks_oidc_provider_arn == null ? [] : [var.eks_oidc_provider_arn]
    content {
      sid     = "EksServiceAccounts"
      effect  = "Allow"
      actions = ["sts:AssumeRoleWithWebIdentity"]
      principals {
        type        = "Federated"
        identifiers = [statement.value]
      }
      condition {
        test     = "StringEquals"
        variable = "${local.eks_issuer}:aud"
        values   = ["sts.amazonaws.com"]
      }
      condition {
        test     = "StringEquals"
        variable = "${local.eks_issuer}:sub"
        values   = [for sa in var.eks_service_accounts : "system:serviceaccount:${sa}"]
      }
    }
  }
}

resource "aws_iam_role" "training" {
  name                 = "${var.name}-training"
  assume_role_policy   = data.aws_iam_policy_document.training_trust.json
  max_session_duration = var.max_session_duration
  tags                 = var.tags

  lifecycle {
    precondition {
      condition     = var.ec2_instance_profile || (var.eks_oidc_provider_arn != null && length(var.eks_service_accounts) > 0)
      error_message = "The training role needs a trust: ec2_instance_profile = true, or eks_oidc_provider_arn with eks_service_accounts."
    }
  }
}

resource "aws_iam_role_policy_attachment" "training" {
  role       = aws_iam_role.training.name
  policy_arn = aws_iam_policy.training.arn
}

resource "aws_iam_instance_profile" "training" {
  count = var.ec2_instance_profile ? 1 : 0
  name  = "${var.name}-training"
  role  = aws_iam_role.training.name
  tags  = var.tags
}

# --- optional: a read-only role for a CI restore step (GitHub Actions / GitLab CI through OIDC) ---------------------------------

data "aws_iam_policy_document" "ci_trust" {
  count = var.ci_oidc_provider_arn == null ? 0 : 1

  statement {
    sid     = "CiOidc"
    effect  = "Allow"
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.ci_oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.ci_issuer}:aud"
      values   = [var.ci_oidc_audience]
    }
    condition {
      test     = "StringLike"
      variable = "${local.ci_issuer}:sub"
      values   = var.ci_oidc_subjects
    }
  }
}

resource "aws_iam_role" "ci_restore" {
  count                = var.ci_oidc_provider_arn == null ? 0 : 1
  name                 = "${var.name}-ci-restore"
  assume_role_policy   = data.aws_iam_policy_document.ci_trust[0].json
  max_session_duration = var.max_session_duration
  tags                 = var.tags

  lifecycle {
    precondition {
      condition     = length(var.ci_oidc_subjects) > 0
      error_message = "ci_oidc_subjects must name at least one repository subject when ci_oidc_provider_arn is set."
    }
  }
}

resource "aws_iam_role_policy_attachment" "ci_restore" {
  count      = var.ci_oidc_provider_arn == null ? 0 : 1
  role       = aws_iam_role.ci_restore[0].name
  policy_arn = aws_iam_policy.restore.arn
}
