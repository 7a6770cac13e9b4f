import pytest

from emotion_models.labels import CLASSES, parse_clip


@pytest.mark.parametrize("path,label,corpus,speaker", [
    # RAVDESS speech and song, emotion code in the third field, actor in the last
    ("Emotions/Angry/03-01-05-01-02-01-12.wav", "angry", "ravdess", "ravdess:12"),
    ("Actor_01/03-02-03-02-01-01-01.wav", "happy", "ravdess", "ravdess:01"),
    ("03-01-01-01-01-01-07.wav", "neutral", "ravdess", "ravdess:07"),
    ("03-01-08-02-02-02-24.wav", "surprised", "ravdess", "ravdess:24"),
    ("03-01-07-01-01-01-03.wav", "disgusted", "ravdess", "ravdess:03"),
    ("03-01-06-01-01-01-03.wav", "fearful", "ravdess", "ravdess:03"),
    ("03-01-04-01-01-01-03.wav", "sad", "ravdess", "ravdess:03"),
    # CREMA-D
    ("Emotions/Disgusted/1001_DFA_DIS_XX.wav", "disgusted", "crema-d", "crema-d:1001"),
    ("AudioWAV/1091_WSI_FEA_HI.wav", "fearful", "crema-d", "crema-d:1091"),
    ("1045_IEO_NEU_LO.wav", "neutral", "crema-d", "crema-d:1045"),
    # TESS, including OA_ and pleasant surprise
    ("OAF_angry/OAF_back_angry.wav", "angry", "tess", "tess:OAF"),
    ("YAF_pleasant_surprised/YAF_youth_ps.wav", "surprised", "tess", "tess:YAF"),
    ("OA_bite_neutral.wav", "neutral", "tess", "tess:OAF"),
    ("YAF_germ_disgust.wav", "disgusted", "tess", "tess:YAF"),
    ("OAF_fear/OAF_dog_fear.wav", "fearful", "tess", "tess:OAF"),
    # SAVEE original forms
    ("DC_a01.wav", "angry", "savee", "savee:DC"),
    ("AudioData/JK/sa03.wav", "sad", "savee", "savee:JK"),
    ("AudioData/KL/su15.wav", "surprised", "savee", "savee:KL"),
    # SAVEE in the Kaggle merge: label from the name, speaker from the folder
    ("Emotions/Angry/sa14.wav", "sad", "savee", "savee:angry"),
    ("Emotions/Neutral/h07.wav", "happy", "savee", "savee:neutral"),
    # our own synthetic files
    ("Emotions/Suprised/synth_S03_surprised_00012.wav", "surprised", "synthetic", "synthetic:S03"),
    # unknown naming: the folder gives the label, the speaker is unknown; any case, and the merge's typo
    ("Emotions/suprised/clip0001.wav", "surprised", "unknown", ""),
    ("EMOTIONS/HAPPY/whatever.wav", "happy", "unknown", ""),
    ("Surprised/x.wav", "surprised", "unknown", ""),
])
def test_parse(path, label, corpus, speaker):
    clip = parse_clip(path)
    assert (clip.label, clip.corpus, clip.speaker) == (label, corpus, speaker)
    assert clip.label in CLASSES


def test_ravdess_calm_is_skipped_with_reason():
    clip = parse_clip("Emotions/Neutral/03-01-02-01-01-01-05.wav")
    assert clip.label is None and "calm" in clip.skip_reason


def test_folder_disagreement_is_visible():
    clip = parse_clip("Emotions/Angry/sa14.wav")
    assert clip.folder_label == "angry" and clip.label == "sad"


def test_unlabelled_file_is_skipped():
    clip = parse_clip("misc/recording.wav")
    assert clip.label is None and clip.skip_reason
