"""``smsblock aws-model``: install the SMS service model so the AWS CLI and boto3 can drive ``serve``."""

from __future__ import annotations

from . import print_json


def register(sub) -> None:
    p = sub.add_parser(
        "aws-model", help="install the SMS service model for the AWS CLI and boto3",
        description="Take the SMS 2016-10-24 model from a botocore release that still ships it "
                    "(downloaded with pip, or --wheel FILE) and write it where the AWS CLI and boto3 "
                    "find it (~/.aws/models by default), so that `aws sms ... --endpoint-url URL` "
                    "works against `smsblock serve`.")
    p.add_argument("--dest", metavar="DIR",
                   help="models folder (default ~/.aws/models; elsewhere, point AWS_DATA_PATH at it)")
    p.add_argument("--wheel", metavar="FILE", help="a botocore wheel file to take the model from (offline)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..service.awsmodel import BOTOCORE_WITH_SMS, default_models_dir, install_sms_model

    folder = install_sms_model(args.dest, wheel=args.wheel)
    models = folder.parent.parent
    default = models.resolve() == default_models_dir().resolve()
    if args.json:
        print_json({"model_dir": str(folder), "aws_data_path": str(models),
                    "needs_aws_data_path": not default})
        return 0
    print(f"SMS model ({'from ' + args.wheel if args.wheel else 'botocore ' + BOTOCORE_WITH_SMS}) "
          f"installed in {folder}")
    if not default:
        print(f"export AWS_DATA_PATH={models}   # so the AWS CLI and boto3 find it")
    print("then: aws sms get-servers --endpoint-url http://127.0.0.1:8080")
    return 0
