"""Every text the bot shows, in English and Korean; the user's Telegram language picks one."""

from __future__ import annotations

from typing import Final

TEXTS: Final[dict[str, dict[str, str]]] = {
    "en": {
        "start": (
            "I hide the bystanders in your photos: every face you do not keep is replaced "
            "by a person who does not exist (or blurred, or pixelated).\n"
            "Send me a photo (as a file for full resolution), tap the faces to keep, then tap Anonymize."
        ),
        "help": (
            "What: I detect every face and replace the ones you do not keep; nobody else sees your photo.\n"
            "How: send a photo or an image file, tap numbers to keep faces (✅), tap Anonymize. "
            "/settings picks synthetic faces, blur or pixelation; /privacy says what I store."
        ),
        "privacy": (
            "While you choose, I keep your photo in memory and, on disk, only Telegram's file id, the face "
            "boxes and your choices, so that a restart loses nothing. All of it is deleted after "
            "{minutes} minutes without a tap, or at once on Cancel. Results carry no EXIF or location; "
            "I keep no copy of them."
        ),
        "settings": "Replacement mode: {mode}. Applies to photos you send from now on.",
        "mode_synthetic": "synthetic person",
        "mode_blur": "blur",
        "mode_pixelate": "pixelate",
        "cancelled": "Cancelled; your photo is deleted.",
        "nothing_to_cancel": "There is nothing to cancel.",
        "no_faces": "I found no faces in this photo, so there is nothing to hide.",
        "bad_image": "I could not use this file: {reason}.",
        "preview": (
            "{count} face(s) found; {kept} kept ✅, the others will be replaced ({mode}).\n"
            "Tap a number to keep or replace that face, then tap Anonymize."
        ),
        "preview_page": "Page {page} of {pages}.",
        "result": "Done: {replaced} face(s) replaced ({mode}). The file below is the full-resolution copy.",
        "fallback": "Face {numbers}: blurred instead ({reason}).",
        "reason_doubtful": "maybe not a face (low detection score {score:g})",
        "reason_too_small": "face under {size:g} px",
        "reason_profile": "profile face",
        "reason_unreachable": "no synthetic {gender} faces aged {age_group} yet",
        "reason_pose": "no synthetic face in this pose",
        "reason_no_match": "no generated face matched",
        "gender_male": "male",
        "gender_female": "female",
        "done_preview": "Anonymized. Use the buttons under the result to re-roll a face or start over.",
        "keep_all": "Keep all",
        "replace_all": "Replace all",
        "anonymize": "Anonymize",
        "cancel": "Cancel",
        "reroll": "Re-roll {number}",
        "start_over": "Start over",
        "previous": "‹ Prev",
        "next": "Next ›",
        "not_yours": "Only the person who sent this photo can choose.",
        "expired": "This selection expired; please send the photo again.",
        "invalid": "This button is not valid.",
        "busy_user": "Still working on your previous photo; this one is next.",
        "rate_limited": "Too many photos; you can send {limit} per minute. Please wait a little.",
        "queue_full": "I am busy right now; please try again in a minute.",
        "queue_position": "You are number {position} in the queue.",
        "not_allowed": "This bot is private.",
        "failed": "Something went wrong with this photo; please try again.",
        "send_photo": "Send me a photo to begin.",
        "too_big": "the file is larger than the 20 MB bots may download; send a smaller one",
    },
    "ko": {
        "start": (
            "사진 속 행인의 얼굴을 가려 드립니다: 남기지 않는 얼굴은 모두 존재하지 않는 사람의 얼굴로 "
            "바뀝니다(또는 흐림, 모자이크).\n"
            "사진을 보내고(원본 해상도는 파일로), 남길 얼굴을 누른 뒤 '익명화'를 누르세요."
        ),
        "help": (
            "기능: 모든 얼굴을 찾아 남기지 않은 얼굴을 바꿉니다. 사진은 다른 누구에게도 보이지 않습니다.\n"
            "사용법: 사진이나 이미지 파일을 보내고, 번호를 눌러 남길 얼굴(✅)을 고른 뒤 '익명화'를 누르세요. "
            "/settings 에서 가상 얼굴·흐림·모자이크를 고르고, /privacy 에서 저장 정보를 확인하세요."
        ),
        "privacy": (
            "선택하는 동안 사진은 메모리에만 두고, 디스크에는 텔레그램 파일 ID, 얼굴 위치, 선택 내용만 "
            "저장해 재시작해도 이어서 할 수 있습니다. 모두 {minutes}분 동안 아무 입력이 없거나 '취소'를 "
            "누르면 삭제됩니다. 결과물에는 EXIF나 위치 정보가 없으며, 사본을 보관하지 않습니다."
        ),
        "settings": "바꾸기 방식: {mode}. 이제부터 보내는 사진에 적용됩니다.",
        "mode_synthetic": "가상 인물",
        "mode_blur": "흐림",
        "mode_pixelate": "모자이크",
        "cancelled": "취소했습니다. 사진은 삭제되었습니다.",
        "nothing_to_cancel": "취소할 작업이 없습니다.",
        "no_faces": "이 사진에서 얼굴을 찾지 못했습니다. 가릴 것이 없습니다.",
        "bad_image": "이 파일을 사용할 수 없습니다: {reason}.",
        "preview": (
            "얼굴 {count}개를 찾았습니다. {kept}개는 남기고(✅) 나머지는 바꿉니다({mode}).\n"
            "번호를 눌러 얼굴을 남기거나 바꾸고, '익명화'를 누르세요."
        ),
        "preview_page": "{pages}쪽 중 {page}쪽.",
        "result": "완료: 얼굴 {replaced}개를 바꿨습니다({mode}). 아래 파일은 원본 해상도입니다.",
        "fallback": "얼굴 {numbers}: 대신 흐리게 처리했습니다({reason}).",
        "reason_doubtful": "얼굴이 아닐 수 있음 (낮은 검출 점수 {score:g})",
        "reason_too_small": "{size:g}px보다 작은 얼굴",
        "reason_profile": "옆모습 얼굴",
        "reason_unreachable": "{age_group}세 {gender} 합성 얼굴은 아직 만들 수 없음",
        "reason_pose": "이 방향의 합성 얼굴 없음",
        "reason_no_match": "조건에 맞는 합성 얼굴 없음",
        "gender_male": "남성",
        "gender_female": "여성",
        "done_preview": "익명화했습니다. 결과 아래 버튼으로 얼굴을 다시 만들거나 처음부터 할 수 있습니다.",
        "keep_all": "모두 남기기",
        "replace_all": "모두 바꾸기",
        "anonymize": "익명화",
        "cancel": "취소",
        "reroll": "{number} 다시",
        "start_over": "처음부터",
        "previous": "‹ 이전",
        "next": "다음 ›",
        "not_yours": "사진을 보낸 사람만 선택할 수 있습니다.",
        "expired": "선택 시간이 지났습니다. 사진을 다시 보내 주세요.",
        "invalid": "올바르지 않은 버튼입니다.",
        "busy_user": "이전 사진을 처리하는 중입니다. 이 사진은 그다음입니다.",
        "rate_limited": "사진이 너무 많습니다. 1분에 {limit}장까지 보낼 수 있습니다. 잠시 기다려 주세요.",
        "queue_full": "지금은 바쁩니다. 1분 뒤에 다시 시도해 주세요.",
        "queue_position": "대기 순서: {position}번째입니다.",
        "not_allowed": "비공개 봇입니다.",
        "failed": "이 사진을 처리하다 문제가 생겼습니다. 다시 시도해 주세요.",
        "send_photo": "사진을 보내 시작하세요.",
        "too_big": "봇이 받을 수 있는 20MB보다 큰 파일입니다. 더 작은 파일을 보내 주세요",
    },
}


def language(code: str | None) -> str:
    """Korean for any Korean locale ("ko", "ko-KR"), English otherwise."""
    return "ko" if code and code.lower().split("-")[0] == "ko" else "en"


def text(lang: str, key: str, **values: object) -> str:
    return TEXTS[lang][key].format(**values)


def fallback_text(lang: str, fallback) -> str:
    """Why a face was blurred, in the user's language (``fallback``: a pipeline.types.Fallback)."""
    values = dict(fallback.values)
    if "gender" in values:
        values["gender"] = TEXTS[lang][f"gender_{values['gender']}"]
    return text(lang, f"reason_{fallback.code}", **values)


def mode_name(lang: str, mode: str) -> str:
    return TEXTS[lang][f"mode_{mode}"]


COMMANDS: Final[dict[str, list[tuple[str, str]]]] = {
    "en": [("start", "What this bot does"), ("help", "How to use it"), ("settings", "Synthetic face, blur or pixelate"),
           ("privacy", "What is stored, for how long"), ("cancel", "Drop the current photo")],
    "ko": [("start", "봇 소개"), ("help", "사용법"), ("settings", "가상 얼굴, 흐림, 모자이크 선택"),
           ("privacy", "저장 정보와 보관 기간"), ("cancel", "현재 사진 취소")],
}
